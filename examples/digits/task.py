"""A small MLP classifying scikit-learn's bundled 8x8 handwritten digits (1797 images shipped inside the
package: no download). Batches are dicts (``{"image", "label"}``, built by :meth:`DigitsTask.collate`); the
evaluation is the held-out accuracy, the figure the hand-over's parity check compares across families.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer.api import Task

CLASSES = 10
PIXELS = 64


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All images, flattened and scaled to [0, 1], and their labels, in the bundled order."""
    from sklearn.datasets import load_digits  # imported where used: it takes a while

    bunch = load_digits()
    return torch.tensor(bunch.data / 16.0, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.int64)


class Digits(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item ``i``: ``(image, label)``. The last ``held_out`` images are the test split, the rest the train
    split: a fixed split, the same on every process."""

    def __init__(self, split: str, held_out: int) -> None:
        images, labels = _digits()
        if not 0 < held_out < len(labels):
            raise ValueError(f"task.held_out={held_out}: must be in 1..{len(labels) - 1}")
        part = slice(None, -held_out) if split == "train" else slice(-held_out, None)
        self.images, self.labels = images[part], labels[part]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


class DigitsTask(Task):
    def __init__(
        self, hidden: int = 64, lr: float = 0.1, momentum: float = 0.9, lr_step: int = 50, held_out: int = 297
    ) -> None:
        """``hidden``: the MLP's width; SGD at ``lr`` with ``momentum``, the rate halved every ``lr_step``
        optimizer steps; ``held_out``: how many of the last images form the test split."""
        self.hidden, self.lr, self.momentum, self.lr_step, self.held_out = (
            hidden,
            lr,
            momentum,
            lr_step,
            held_out,
        )

    def build_model(self, device: torch.device) -> nn.Module:
        return nn.Sequential(nn.Linear(PIXELS, self.hidden), nn.ReLU(), nn.Linear(self.hidden, CLASSES)).to(
            device
        )

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step, gamma=0.5)

    def train_dataset(self) -> Dataset[Any]:
        return Digits("train", self.held_out)

    def eval_dataset(self) -> Dataset[Any]:
        return Digits("test", self.held_out)

    def collate(self, samples: list[Any]) -> dict[str, torch.Tensor]:
        images, labels = zip(*samples, strict=True)
        return {"image": torch.stack(images), "label": torch.stack(labels)}

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(model(batch["image"]), batch["label"])

    def evaluate(self, model: nn.Module, batches: list[Any]) -> float:
        """The fraction of held-out images classified correctly."""
        correct = sum(int((model(b["image"]).argmax(dim=-1) == b["label"]).sum()) for b in batches)
        total = sum(len(b["label"]) for b in batches)
        return correct / total if total else float("nan")
