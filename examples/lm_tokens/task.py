"""A GPT trained on nanoGPT-layout token files (``train.bin``, ``val.bin``: flat ``uint16`` arrays).

Build the files with ``python -m examples.lm_tokens.prepare --out DIR``, then select this task with
``+task._target_=examples.lm_tokens.task.TokenFileTask +task.data_dir=DIR`` (see this directory's README).
The files are memory-mapped, never read whole: each rank touches only the windows of its own samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer.api import Task
from trainer.model import GPT


class TokenWindows(Dataset[torch.Tensor]):
    """Item ``i``: the ``seq_len + 1`` tokens starting at ``i * seq_len`` of a flat ``uint16`` token file
    (inputs and their next-token targets; consecutive windows share one token). ``len``: how many fit."""

    def __init__(self, path: Path, seq_len: int) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"no token file {path}: build it with "
                f"`python -m examples.lm_tokens.prepare --out {path.parent}` (task.data_dir names its directory)"
            )
        self.path, self.seq_len = path, seq_len
        self.windows = max(0, (path.stat().st_size // 2 - 1) // seq_len)
        self._tokens: np.memmap[Any, np.dtype[np.uint16]] | None = None

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.windows:
            raise IndexError(f"window {index} of {self.windows} in {self.path}")
        if self._tokens is None:  # opened on first use, in the process that reads
            self._tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        start = index * self.seq_len
        return torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))


class TokenFileTask(Task):
    def __init__(
        self,
        data_dir: str,
        seq_len: int = 64,
        vocab_size: int = 256,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        decay_steps: int = 1000,
        weight_decay: float = 0.1,
    ) -> None:
        """``data_dir``: the directory ``prepare`` wrote (absolute, or relative to each process's working
        directory); ``seq_len``: tokens a sample predicts; ``vocab_size``, ``n_layer``, ``n_head``, ``n_embd``,
        ``dropout``: the :class:`trainer.model.GPT`'s sizes; ``lr`` decays to ``min_lr`` along a cosine over
        ``decay_steps`` optimizer steps; ``weight_decay`` applies to matrices only (nanoGPT's grouping)."""
        self.data_dir = Path(data_dir)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.n_layer, self.n_head, self.n_embd, self.dropout = n_layer, n_head, n_embd, dropout
        self.lr, self.min_lr, self.decay_steps, self.weight_decay = lr, min_lr, decay_steps, weight_decay

    def build_model(self, device: torch.device) -> nn.Module:
        model = GPT(self.vocab_size, self.seq_len, self.n_layer, self.n_head, self.n_embd, self.dropout)
        return model.to(device)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": matrices, "weight_decay": self.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.decay_steps, eta_min=self.min_lr
        )

    def train_dataset(self) -> Dataset[Any]:
        return TokenWindows(self.data_dir / "train.bin", self.seq_len)

    def eval_dataset(self) -> Dataset[Any]:
        return TokenWindows(self.data_dir / "val.bin", self.seq_len)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
