"""The next step's batches, collated on a background thread while the current step trains.

A step's batches are a pure function of their global sample indices (:mod:`trainer.data.positions`), and the
indices of step ``s + 1`` are known while step ``s`` runs, so they can be read and collated ahead — pinned,
when the device is an accelerator, so that the copy to the device runs without the host waiting for it. The
device then never waits on the host for data, and a resumed or recovered run reads exactly what an
uninterrupted one reads: a batch asked for but not prepared (after a restore, a new rank, another world
size) is made on the spot, and whatever was prepared for another position is dropped.

The dataset and the collate function are called by one thread at a time (never concurrently with each
other), but that thread runs alongside the training step: they must not draw from torch's global random
generator (a generator seeded from the sample index does not depend on the thread), or the run stops
being reproducible. ``train.prefetch=false`` calls them on the training thread instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainer.data.positions import map_tensors

Key = tuple[int, ...]


class Prefetcher:
    def __init__(self, make: Callable[[list[int]], Any], *, pin: bool, enabled: bool) -> None:
        """``make(indices)`` collates the batch of those global samples on the CPU; ``pin`` puts it in
        page-locked memory (accelerators); ``enabled=False`` makes every batch when it is asked for."""
        self._make, self._pin, self.enabled = make, pin, enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self._ahead: dict[Key, Future[Any]] = {}

    def _prepared(self, key: Key) -> Any:
        batch = self._make(list(key))
        return map_tensors(batch, lambda t: t.pin_memory()) if self._pin else batch

    def get(self, indices: Sequence[int]) -> Any:
        """The batch of ``indices``: prepared ahead if it was, else made now. Errors of the dataset or the
        collate function are raised here, on the caller's thread, as if it had called them."""
        key = tuple(indices)
        future = self._ahead.pop(key, None)
        if future is not None:
            return future.result()
        self.drop()  # another position: nothing prepared is wanted, and nothing may run beside this call
        return self._prepared(key)

    def ahead(self, batches: Sequence[Sequence[int]]) -> None:
        """Start preparing these batches (the next step's micro-batches), in order, dropping any other."""
        if self._pool is None:
            return
        keys = [tuple(b) for b in batches]
        for key in [k for k in self._ahead if k not in keys]:
            self._forget(self._ahead.pop(key))
        for key in keys:
            if key not in self._ahead:
                self._ahead[key] = self._pool.submit(self._prepared, key)

    def drop(self) -> None:
        """Forget every batch prepared or in preparation; returns once none is being made."""
        while self._ahead:
            self._forget(self._ahead.popitem()[1])

    @staticmethod
    def _forget(future: Future[Any]) -> None:
        if (
            not future.cancel()
        ):  # already running: let it finish, so the dataset is never called twice at once
            future.exception()  # waits; an error of a batch nobody wants is not raised

    def close(self) -> None:
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
