"""Explicit registry of device families. ``auto`` resolves to the first available of NPU → CUDA → CPU."""

from __future__ import annotations

import re
from collections.abc import Callable

from trainer.devices.base import DeviceAdapter
from trainer.errors import DeviceUnavailableError, UnknownDeviceFamilyError

#: name → factory. Filled by :func:`register`; the built-in families register on import of
#: :mod:`trainer.devices`.
ADAPTERS: dict[str, Callable[[], DeviceAdapter]] = {}

#: Order in which ``device=auto`` tries the real families.
AUTO_ORDER: tuple[str, ...] = ("npu", "cuda", "cpu")


def register(name: str, factory: Callable[[], DeviceAdapter], *, replace: bool = False) -> None:
    """Register ``factory`` under ``name``; refuses to shadow an existing family unless ``replace``."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(
            f"device family name {name!r}: allowed: lower-case letters, digits and '_', letter first"
        )
    if name in ADAPTERS and not replace:
        raise ValueError(f"device family {name!r} is already registered")
    ADAPTERS[name] = factory


def family_names() -> list[str]:
    """Registered family names, sorted, plus the pseudo-family ``auto``."""
    return [*sorted(ADAPTERS), "auto"]


def get_adapter(name: str) -> DeviceAdapter:
    """The adapter for ``name``; ``auto`` picks the first available real family.

    Raises :class:`UnknownDeviceFamilyError` naming the allowed values when ``name`` is not registered.
    """
    if name == "auto":
        return resolve_auto()
    try:
        factory = ADAPTERS[name]
    except KeyError:
        raise UnknownDeviceFamilyError(
            f"device.family={name!r} is not a registered device family; allowed: {', '.join(family_names())}"
        ) from None
    adapter = factory()
    if adapter.name != name:
        raise TypeError(f"adapter registered as {name!r} reports name {adapter.name!r}")
    return adapter


def resolve_auto() -> DeviceAdapter:
    """First available family in :data:`AUTO_ORDER`."""
    reasons = []
    for name in AUTO_ORDER:
        if name not in ADAPTERS:
            continue
        adapter = ADAPTERS[name]()
        if adapter.is_available():
            return adapter
        reasons.append(f"{name}: {adapter.unavailable_reason()}")
    raise DeviceUnavailableError("device.family=auto found no available family (" + "; ".join(reasons) + ")")
