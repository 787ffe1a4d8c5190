"""Which standard-library package a 64-byte snippet of Python source comes from: a small byte-level
convolutional classifier whose ``forward`` returns a dataclass, the way model libraries return output objects
(Hugging Face's ``SequenceClassifierOutput``: logits next to hidden and pooled states), not a bare tensor.

The data is the interpreter's own standard library (``asyncio``, ``email``, ``multiprocessing``, ``xml``):
real text on every machine, no download. Batches are dataclasses too (:class:`Snippets`). The task keeps
extra state that must survive a lost worker: an exponential moving average of the weights (tensors) and the
number of steps taken (JSON), which drives a curriculum — training starts on short prefixes of the snippets
and doubles their length every ``grow_every`` steps, so a replaced worker that forgot the count would train
on other inputs than its peers.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer.api import StepControl, Task

PACKAGES = ("asyncio", "email", "multiprocessing", "xml")
SNIPPET = 64  # bytes
VOCAB = 256  # byte values


@cache
def _snippets(test_every: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train" | "test": (bytes (N, SNIPPET) uint8, package index (N,))}``: each package's ``*.py`` files
    (its own tests left out) in sorted order, cut into non-overlapping snippets. The split is by file — every
    ``test_every``-th file of a package is held out — so test snippets come from code never trained on."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, tuple[list[torch.Tensor], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, package in enumerate(PACKAGES):
        files = sorted(
            p for p in (stdlib / package).rglob("*.py") if "test" not in p.relative_to(stdlib).parts[1:-1]
        )
        for i, path in enumerate(files):
            data = path.read_bytes()
            usable = len(data) // SNIPPET * SNIPPET
            if not usable:
                continue
            windows = torch.frombuffer(bytearray(data[:usable]), dtype=torch.uint8).view(-1, SNIPPET)
            snippets, labels = parts["test" if (i + 1) % test_every == 0 else "train"]
            snippets.append(windows)
            labels.extend([label] * len(windows))
    split = {name: (torch.cat(s), torch.tensor(y)) for name, (s, y) in parts.items()}
    # The held-out set in a fixed shuffled order, so that its first n snippets (``train.eval_samples``) mix
    # all packages instead of being all ``asyncio``.
    order = torch.randperm(len(split["test"][1]), generator=torch.Generator().manual_seed(0))
    split["test"] = (split["test"][0][order], split["test"][1][order])
    return split


@dataclass
class Snippets:
    """A batch: the snippets' bytes ``(B, T)`` and their package indices ``(B,)``."""

    tokens: torch.Tensor
    labels: torch.Tensor


@dataclass
class ClassifierOutput:
    """What :class:`ByteConvClassifier` returns. Only ``logits`` feed the loss; the other fields are what a
    downstream user of such a model reads (features for retrieval, probing, distillation)."""

    logits: torch.Tensor  # (B, classes)
    pooled: torch.Tensor  # (B, width): the snippet's embedding
    hidden_states: torch.Tensor  # (B, T, width): one vector per byte


class ByteConvClassifier(nn.Module):
    """Byte embeddings, two 1-D convolutions, mean pooling over the snippet, a linear head."""

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.conv1 = nn.Conv1d(width, width, kernel_size=5, padding=2)
        self.conv2 = nn.Conv1d(width, width, kernel_size=5, padding=2)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> ClassifierOutput:
        x = self.embed(tokens).transpose(1, 2)  # (B, width, T): Conv1d wants channels first
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        hidden = x.transpose(1, 2)
        pooled = hidden.mean(dim=1)
        return ClassifierOutput(logits=self.head(pooled), pooled=pooled, hidden_states=hidden)


class SnippetDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item ``i``: ``(bytes (SNIPPET,) int64, package index)`` of the ``split``; the same on every process."""

    def __init__(self, split: str, test_every: int) -> None:
        self.tokens, self.labels = _snippets(test_every)[split]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[index].long(), self.labels[index]


class SnippetTask(Task):
    def __init__(
        self,
        width: int = 32,
        lr: float = 3e-3,
        warmup: int = 20,
        ema: float = 0.99,
        min_len: int = 16,
        grow_every: int = 50,
        test_every: int = 5,
    ) -> None:
        """``width``: the model's channels; AdamW at ``lr`` after ``warmup`` steps of linear warm-up;
        ``ema``: the decay of the weights' moving average; the curriculum trains on the first ``min_len``
        bytes of each snippet, doubled every ``grow_every`` steps up to all 64; ``test_every``: every
        ``test_every``-th file of a package is held out."""
        if not 1 <= min_len <= SNIPPET:
            raise ValueError(f"task.min_len={min_len}: must be in 1..{SNIPPET}")
        self.width, self.lr, self.warmup, self.decay = width, lr, warmup, ema
        self.min_len, self.grow_every, self.test_every = min_len, grow_every, test_every
        self.ema: dict[str, torch.Tensor] = {}
        self.steps_seen = 0  # the curriculum's position

    def build_model(self, device: torch.device) -> nn.Module:
        model = ByteConvClassifier(self.width, len(PACKAGES)).to(device)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self._warmup) if self.warmup else None

    def _warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup)

    def train_dataset(self) -> Dataset[Any]:
        return SnippetDataset("train", self.test_every)

    def eval_dataset(self) -> Dataset[Any]:
        return SnippetDataset("test", self.test_every)

    def collate(self, samples: list[Any]) -> Snippets:
        tokens, labels = zip(*samples, strict=True)
        return Snippets(torch.stack(tokens), torch.stack(labels))

    def curriculum_length(self) -> int:
        """How many leading bytes of each snippet the next training step sees."""
        return min(SNIPPET, self.min_len * 2 ** (self.steps_seen // self.grow_every))

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        output: ClassifierOutput = model(batch.tokens)
        return F.cross_entropy(output.logits, batch.labels)

    def train_step(self, model: nn.Module, batch: Any, control: StepControl) -> torch.Tensor:
        """The default step on the curriculum's prefix of the batch, then the EMA update and the count."""
        loss = self.loss(model, Snippets(batch.tokens[:, : self.curriculum_length()], batch.labels))
        control.backward(loss)
        control.optimizer_step()
        with torch.no_grad():
            inner: Any = getattr(model, "module", model)  # the bare module inside a DDP wrapper
            for key, value in inner.state_dict().items():
                self.ema[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
        self.steps_seen += 1
        return loss

    def evaluate(self, model: nn.Module, batches: list[Any]) -> float:
        """The fraction of held-out snippets (all 64 bytes) attributed to the right package."""
        correct = sum(int((model(b.tokens).logits.argmax(dim=-1) == b.labels).sum()) for b in batches)
        total = sum(len(b.labels) for b in batches)
        return correct / total if total else float("nan")

    def extra_state(self) -> dict[str, Any]:
        return {**{f"ema.{k}": v for k, v in self.ema.items()}, "steps_seen": self.steps_seen}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key.startswith("ema."):
                self.ema[key.removeprefix("ema.")].copy_(value)
        self.steps_seen = int(state["steps_seen"])
