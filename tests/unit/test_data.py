"""The synthetic corpus and the sampler: data position is a pure function of the global sample index."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.data import GlobalBatchSampler, SyntheticCorpus
from trainer.data.positions import to_device
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


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_world_size_does_not_change_which_samples_a_step_sees(world_size: int) -> None:
    for step in (0, 7):
        union = [i for r in range(world_size) for i in GlobalBatchSampler(16, r, world_size).indices(step)]
        assert union == list(range(step * 16, (step + 1) * 16))


def test_batch_not_divisible_by_world_size_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"train\.global_batch_size=10 is not divisible by the world size 4"
    ):
        GlobalBatchSampler(10, 0, 4)


def test_to_device_moves_the_tensors_of_a_dataclass_batch_and_keeps_its_type() -> None:
    @dataclasses.dataclass
    class Batch:
        tokens: torch.Tensor
        extra: dict[str, torch.Tensor]
        name: str = "b"

    moved = to_device(Batch(torch.zeros(2, 3), {"mask": torch.ones(2)}), torch.device("meta"))
    assert isinstance(moved, Batch) and moved.name == "b"
    assert moved.tokens.device.type == "meta" and moved.extra["mask"].device.type == "meta"
