"""The built-in task: next-token prediction with the ``model``, ``data`` and ``optim`` config groups.

A model maps token ids ``(B, T)`` to logits ``(B, T, V)``; a data source maps a global sample index to
``T + 1`` tokens (inputs and shifted targets) and may offer ``held_out(n)`` for evaluation. It is a
:class:`~trainer.api.Task` like any user's, built by the job when the config names no ``task``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from trainer.api import Task


def _build(node: Any) -> Any:
    return instantiate(node if isinstance(node, dict) else OmegaConf.structured(node))


class LanguageModelTask(Task):
    def __init__(self, model: Any, data: Any, optim: Any, eval_samples: int = 16) -> None:
        """``model``, ``data``, ``optim``: ``_target_`` config nodes (schemas or dicts); ``eval_samples``: how
        many held-out sequences the evaluation reads."""
        self.model_node, self.data_node, self.optim_node = model, data, optim
        self.eval_samples = eval_samples
        self.corpus: Any = None

    def build_model(self, device: torch.device) -> nn.Module:
        module: nn.Module = _build(self.model_node).to(device)
        return module

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        blocks = getattr(model, "blocks", None)  # the built-in GPT's transformer blocks, one unit each
        return list(blocks) if isinstance(blocks, nn.ModuleList) else []

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        optimizer: torch.optim.Optimizer = _build(self.optim_node)(model.parameters())
        return optimizer

    def train_dataset(self) -> Dataset[Any]:
        if self.corpus is None:
            self.corpus = _build(self.data_node)
        return self.corpus  # type: ignore[no-any-return]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def eval_dataset(self) -> Dataset[Any] | None:
        corpus = self.train_dataset()
        if self.eval_samples == 0 or not hasattr(corpus, "held_out"):
            return None
        held_out: Dataset[Any] = corpus.held_out(self.eval_samples)  # a tensor: rows are samples
        return held_out
