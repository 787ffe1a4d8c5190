"""Data sources. A source maps a global sample index to a token sequence; see :mod:`trainer.data.synthetic`."""

from trainer.data.sampler import GlobalBatchSampler, split
from trainer.data.synthetic import SyntheticCorpus

__all__ = ["GlobalBatchSampler", "SyntheticCorpus", "split"]
