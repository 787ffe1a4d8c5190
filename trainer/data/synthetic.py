"""A deterministic synthetic corpus with structure a model can learn.

Sample ``i`` is a pure function of ``(seed, i)``: no files, no state, no epochs, so any rank of any world
size on any device family can produce exactly the sample the run needs next. Each sequence follows a hidden
Markov chain — the next token is ``table[token]`` with probability ``1 - noise`` and uniform otherwise — so
the loss falls from ``ln(vocab_size)`` towards the chain's entropy as the model learns ``table``.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, index: int) -> int:
    """SplitMix64 of (seed, index): decorrelates neighbouring indices; stable across platforms."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class SyntheticCorpus:
    """Sequences of ``seq_len + 1`` tokens (inputs and shifted targets) indexed by global sample number.

    Indices ``>= 0`` are the training stream; :meth:`held_out` returns samples from a disjoint stream.
    """

    def __init__(self, seed: int = 0, vocab_size: int = 256, seq_len: int = 64, noise: float = 0.1) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"data.noise={noise} must be within [0, 1]")
        self.seed = seed
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.noise = noise
        g = torch.Generator().manual_seed(mix_seed(seed, -1))
        self.table = torch.randperm(vocab_size, generator=g)
        #: ``powers[k][v]``: the chain's token ``k`` steps after token ``v`` (the table applied ``k`` times).
        self.powers = torch.empty(seq_len + 1, vocab_size, dtype=torch.int64)
        self.powers[0] = torch.arange(vocab_size)
        for k in range(1, seq_len + 1):
            self.powers[k] = self.table[self.powers[k - 1]]

    def entropy_floor(self) -> float:
        """Per-token cross-entropy of a model that knows the chain exactly (nats)."""
        v, p = self.vocab_size, self.noise
        hit = 1 - p + p / v
        miss = p / v
        return -(hit * math.log(hit) + (v - 1) * miss * math.log(miss)) if p > 0 else 0.0

    def sample(self, index: int) -> torch.Tensor:
        return self.batch([index])[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.sample(index)

    def batch(self, indices: list[int]) -> torch.Tensor:
        """Samples ``indices`` stacked into a (len(indices), seq_len + 1) int64 tensor."""
        n, length = len(indices), self.seq_len + 1
        first = torch.empty(n, dtype=torch.int64)
        noisy = torch.empty(n, length, dtype=torch.bool)
        random_tokens = torch.empty(n, length, dtype=torch.int64)
        for row, index in enumerate(indices):
            g = torch.Generator().manual_seed(mix_seed(self.seed, int(index)))
            first[row] = torch.randint(self.vocab_size, (1,), generator=g)
            noisy[row] = torch.rand(length, generator=g) < self.noise
            random_tokens[row] = torch.randint(self.vocab_size, (length,), generator=g)
        # Token t is the random one where the sample is noisy (and the first token at 0), else the chain's
        # successor of token t-1: so it is the chain's token t-r after the token drawn at r, the last
        # position <= t that drew one. All positions at once, in whole-tensor operations.
        noisy[:, 0] = True
        drawn = torch.where(noisy, random_tokens, 0)
        drawn[:, 0] = first
        positions = torch.arange(length).expand(n, length)
        last = torch.where(noisy, positions, 0).cummax(dim=1).values
        return self.powers[positions - last, drawn.gather(1, last)]

    def held_out(self, count: int) -> torch.Tensor:
        """``count`` samples from a stream disjoint from training (negative indices), for evaluation."""
        return self.batch([-(i + 1) for i in range(count)])
