"""From a global sample index to a batch: the framework's data position over a user's dataset.

Global sample ``i`` of a map-style dataset of length ``n`` is item ``perm_e[i mod n]``, where ``e = i // n``
is the epoch and ``perm_e`` a permutation seeded by ``(seed, e)``: every epoch is a fresh shuffle, and the
item behind any index is a pure function of ``(seed, i)`` — on any rank, world size or device family. A
dataset without ``__len__`` is an endless stream: item ``i`` is ``dataset[i]``. A dataset may offer
``batch(items)`` returning the collated batch of those items directly (a fast path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from trainer.data.synthetic import mix_seed


class DataPositions:
    def __init__(self, dataset: Any, seed: int, collate: Callable[[list[Any]], Any]) -> None:
        self.dataset, self.seed, self.collate = dataset, seed, collate
        self.length: int | None = len(dataset) if hasattr(dataset, "__len__") else None
        #: (epoch, its permutation), replaced as one value: the prefetch thread and the training thread may
        #: both read it.
        self._perm = (-1, torch.empty(0, dtype=torch.int64))

    def item(self, index: int) -> int:
        """The dataset item that global sample ``index`` reads."""
        if self.length is None:
            return index
        epoch, offset = divmod(index, self.length)
        cached, perm = self._perm
        if epoch != cached:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            perm = torch.randperm(self.length, generator=g)
            self._perm = (epoch, perm)
        return int(perm[offset])

    def batch(self, indices: list[int]) -> Any:
        """The collated batch of global samples ``indices`` (on the CPU)."""
        items = [self.item(i) for i in indices]
        if hasattr(self.dataset, "batch"):
            return self.dataset.batch(items)
        return self.collate([self.dataset[i] for i in items])


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device`` (without the host waiting for the copy where the
    tensor is pinned)."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (nested in tuples, lists, dicts and dataclass
    instances). A dataclass is rebuilt with ``dataclasses.replace``, so it keeps its type, as model libraries'
    batch and output objects expect."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = {
            f.name: map_tensors(getattr(batch, f.name), fn) for f in dataclasses.fields(batch) if f.init
        }
        return dataclasses.replace(batch, **fields)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        moved = [map_tensors(v, fn) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch
