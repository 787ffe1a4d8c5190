"""``train.compile``: the model's forward compiled in place, and its compilations visible to hang detection.

The module is compiled with ``nn.Module.compile`` — in place, so the module object, its parameters and its
state dict's keys stay the plain model's (``torch.compile(model)`` would return a wrapper whose keys carry
``_orig_mod.``, and checkpoints would no longer load into the plain model).

Compilation happens lazily, inside the first steps (forward, then backward) and again whenever a guard fails
(evaluation in eval mode, another batch shape). On a CPU one can take tens of seconds: longer than a rank
may go without progress. While torch compiles, the worker's progress phase is ``compile`` (set from dynamo's
compile-start and compile-end callbacks), which the hang detection judges by
``fault_tolerance.compile_timeout_s`` instead (:func:`trainer.cluster.watch.run_chunk`); when it ends, the
phase it interrupted resumes with a fresh progress mark.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

from torch import nn


class _Marks(Protocol):
    progress: dict[str, Any]

    def mark(self, phase: str) -> None: ...


#: The workers of this process whose progress a compilation marks (one per process outside tests).
_watched: weakref.WeakSet[Any] = weakref.WeakSet()
_interrupted: dict[int, str] = {}
_lock = threading.Lock()
_registered = False


def compile_module(module: nn.Module, worker: _Marks) -> None:
    """Compile ``module``'s forward in place and mark ``worker``'s compilations as such."""
    module.compile()
    _watch(worker)


def _watch(worker: _Marks) -> None:
    global _registered
    with _lock:
        _watched.add(worker)
        if _registered:
            return
        from torch._dynamo.callback import on_compile_end, on_compile_start

        on_compile_start(_started)
        on_compile_end(_ended)
        _registered = True


def _started(_args: Any) -> None:
    for worker in list(_watched):
        phase = worker.progress["phase"]
        if phase != "compile":
            _interrupted[id(worker)] = phase
            worker.mark("compile")


def _ended(_args: Any) -> None:
    for worker in list(_watched):
        if worker.progress["phase"] == "compile":
            worker.mark(_interrupted.pop(id(worker), "compute"))
