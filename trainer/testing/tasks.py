"""A task written the way a user writes one, for tests: every hook of :mod:`trainer.api` in use.

A small classifier over seeded Gaussian clusters: tuple batches, a model returning a dict, an LR scheduler,
a manual step that keeps an exponential moving average of the weights (extra tensors) and a step counter
(an extra JSON value). Importable by Ray workers because it lives in the package.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer.api import StepControl, Task


class Clusters(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``size`` points in ``dim`` dimensions around ``classes`` centres; item ``i`` is ``(x, label)``."""

    def __init__(self, size: int, dim: int, classes: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(classes, dim, generator=g) * 2.0
        self.labels = torch.randint(classes, (size,), generator=g)
        self.points = centres[self.labels] + torch.randn(size, dim, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[index], self.labels[index]


class DictOutput(nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(x)}


class ClusterTask(Task):
    def __init__(
        self,
        size: int = 96,
        dim: int = 8,
        classes: int = 4,
        hidden: int = 16,
        lr: float = 0.05,
        ema: float = 0.9,
        fail_at: int | None = None,
        fail_rank: int = 0,
        nan_at: list[int] | None = None,
        nan_rank: int = 0,
        fused: bool = False,
    ) -> None:
        """``fail_at``, ``fail_rank``: a bug of the user's — the step raises ``KeyError`` at that step on that
        rank (tests of user errors). ``nan_at``, ``nan_rank``: the loss is NaN at those steps on that rank
        (tests of non-finite steps). ``fused``: torch's fused SGD, which skips a non-finite step on the device."""
        self.size, self.dim, self.classes, self.hidden = size, dim, classes, hidden
        self.lr, self.decay = lr, ema
        self.fail_at, self.fail_rank = fail_at, fail_rank
        self.nan_at, self.nan_rank = set(nan_at or ()), nan_rank
        self.fused = fused
        self.ema: dict[str, torch.Tensor] = {}
        self.steps_seen = 0

    def build_model(self, device: torch.device) -> nn.Module:
        model = DictOutput(self.dim, self.hidden, self.classes).to(device)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.model = model
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, fused=self.fused)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)

    def train_dataset(self) -> Dataset[Any]:
        return Clusters(self.size, self.dim, self.classes, seed=1)

    def eval_dataset(self) -> Dataset[Any]:
        return Clusters(32, self.dim, self.classes, seed=2)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x)["logits"], y)

    def train_step(self, model: nn.Module, batch: Any, control: StepControl) -> torch.Tensor:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.steps_seen + 1 == self.fail_at and rank == self.fail_rank:
            raise KeyError("label")  # the user's bug
        loss = self.loss(model, batch)
        if self.steps_seen + 1 in self.nan_at and rank == self.nan_rank:
            loss = loss * float("nan")  # the user's data or model went wrong on this rank
        control.backward(loss)
        control.optimizer_step()
        with torch.no_grad():
            inner: Any = getattr(model, "module", model)  # the bare module inside a DDP wrapper
            for key, value in inner.state_dict().items():
                self.ema[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
        self.steps_seen += 1
        return loss

    def metrics(self) -> dict[str, float]:
        """How far the EMA trails the weights (a figure of the task's own), and the steps it has seen."""
        drift = max((self.ema[k] - v).abs().max().item() for k, v in self._weights().items())
        return {"ema_drift": drift, "steps_seen": self.steps_seen}

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def extra_state(self) -> dict[str, Any]:
        return {**{f"ema.{k}": v for k, v in self.ema.items()}, "steps_seen": self.steps_seen}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key.startswith("ema."):
                self.ema[key.removeprefix("ema.")].copy_(value)
        self.steps_seen = int(state["steps_seen"])
