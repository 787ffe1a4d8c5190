"""The synthetic corpus and the sampler: data position is a pure function of the global sample index."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import pytest
import torch

from trainer.data import GlobalBatchSampler, SyntheticCorpus, split
from trainer.data.positions import to_device
from trainer.data.synthetic import mix_seed
from trainer.errors import ConfigError


def test_sample_is_a_pure_function_of_seed_and_index() -> None:
    a, b = SyntheticCorpus(seed=3), SyntheticCorpus(seed=3)
    assert torch.equal(a.batch([5, 900, 17]), torch.stack([b.sample(5), b.sample(900), b.sample(17)]))
    assert not torch.equal(a.sample(5), a.sample(6))
    assert not torch.equal(a.sample(5), SyntheticCorpus(seed=4).sample(5))


def test_corpus_follows_its_chain_mostly() -> None:
    corpus = SyntheticCorpus(seed=0, vocab_size=64, seq_len=32, noise=0.1)
    tokens = corpus.batch(list(range(200)))
    follows = (corpus.table[tokens[:, :-1]] == tokens[:, 1:]).float().mean().item()
    assert 0.85 < follows < 0.95  # 1 - noise + noise/vocab ≈ 0.90: learnable, not trivial
    assert corpus.entropy_floor() < 0.5 * torch.log(torch.tensor(64.0)).item()


def test_held_out_is_disjoint_from_training() -> None:
    corpus = SyntheticCorpus(seed=0)
    held = corpus.held_out(8)
    train = corpus.batch(list(range(64)))
    assert not any(torch.equal(h, t) for h in held for t in train)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 10])
def test_world_size_does_not_change_which_samples_a_step_sees(world_size: int) -> None:
    """Any world size up to the global batch: the slices tile the step's samples, in order, one sample
    apart at most, and the loss weights make the gradient average the global batch's mean."""
    samplers = [GlobalBatchSampler(10, r, world_size) for r in range(world_size)]
    for step in (0, 7):
        union = [i for s in samplers for i in s.indices(step)]
        assert union == list(range(step * 10, (step + 1) * 10))
    sizes = [s.local_batch_size for s in samplers]
    assert max(sizes) - min(sizes) <= 1
    # (1/W) * sum_r share_r * mean_r == sum_r n_r * mean_r / B: each sample counts 1/B.
    assert all(s.share / world_size / s.local_batch_size == Fraction(1, 10) for s in samplers)


def test_a_global_batch_smaller_than_the_world_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"train\.global_batch_size=3 is smaller than the world size 4; allowed: at least one",
    ):
        GlobalBatchSampler(3, 0, 4)


def test_split_sizes_differ_by_one_at_most_and_add_up() -> None:
    for count, parts in ((10, 3), (8, 8), (9, 2), (5, 1)):
        sizes = split(count, parts)
        assert sum(sizes) == count and len(sizes) == parts and max(sizes) - min(sizes) <= 1


def test_to_device_moves_the_tensors_of_a_dataclass_batch_and_keeps_its_type() -> None:
    @dataclasses.dataclass
    class Batch:
        tokens: torch.Tensor
        extra: dict[str, torch.Tensor]
        name: str = "b"

    moved = to_device(Batch(torch.zeros(2, 3), {"mask": torch.ones(2)}), torch.device("meta"))
    assert isinstance(moved, Batch) and moved.name == "b"
    assert moved.tokens.device.type == "meta" and moved.extra["mask"].device.type == "meta"


@pytest.mark.parametrize(
    ("seed", "vocab", "seq_len", "noise"), [(1234, 1024, 256, 0.1), (3, 16, 8, 0.0), (5, 16, 8, 1.0)]
)
def test_batch_is_the_chain_walked_one_position_at_a_time(
    seed: int, vocab: int, seq_len: int, noise: float
) -> None:
    corpus = SyntheticCorpus(seed, vocab, seq_len, noise)
    indices = list(range(-5, 27))
    walked = []
    for index in indices:  # the definition: each token the table's successor of the last, unless noisy
        g = torch.Generator().manual_seed(mix_seed(seed, index))
        first = torch.randint(vocab, (1,), generator=g)
        noisy = torch.rand(seq_len + 1, generator=g) < noise
        drawn = torch.randint(vocab, (seq_len + 1,), generator=g)
        tokens = [int(first)]
        for t in range(1, seq_len + 1):
            tokens.append(int(drawn[t]) if noisy[t] else int(corpus.table[tokens[-1]]))
        walked.append(tokens)
    assert corpus.batch(indices).tolist() == walked
