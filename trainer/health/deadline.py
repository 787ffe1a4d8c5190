"""Run a call that may block (hardware, network) under a deadline, in a daemon thread.

The call cannot be cancelled — Python has no way to stop a thread stuck in a collective or a driver call —
so on a timeout it is *abandoned*: the daemon thread keeps running until the call returns or the process
exits. Callers that time out on a collective must treat the process group as broken (destroy or replace it),
and processes holding an abandoned thread should leave with ``os._exit`` rather than wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class DeadlineResult(Generic[T]):
    """What became of one call: returned (``ok``), raised (``error``) or did not finish (``timed_out``)."""

    ok: bool
    value: T | None
    #: ``"ExceptionType: message"`` when the call raised, a description when it timed out, else ``None``.
    error: str | None
    timed_out: bool
    elapsed_s: float


def run_with_deadline(fn: Callable[..., T], timeout_s: float, *args: Any, **kwargs: Any) -> DeadlineResult[T]:
    """Call ``fn(*args, **kwargs)`` in a daemon thread and wait at most ``timeout_s`` seconds for it.

    Never raises (the call's exception, even a ``BaseException``, becomes ``error``) and never blocks much
    past ``timeout_s``. On a timeout the thread is left running; see the module docstring.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # the caller gets every failure as a result, never an exception
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    name = getattr(fn, "__name__", type(fn).__name__)
    start = time.monotonic()
    thread = threading.Thread(target=target, name=f"deadline:{name}", daemon=True)
    thread.start()
    thread.join(max(0.0, timeout_s))
    elapsed = time.monotonic() - start
    if thread.is_alive():
        error = f"{name} did not finish within {timeout_s:g} s (abandoned in a daemon thread)"
        return DeadlineResult(ok=False, value=None, error=error, timed_out=True, elapsed_s=elapsed)
    if "error" in outcome:
        return DeadlineResult(
            ok=False, value=None, error=outcome["error"], timed_out=False, elapsed_s=elapsed
        )
    return DeadlineResult(ok=True, value=outcome.get("value"), error=None, timed_out=False, elapsed_s=elapsed)
