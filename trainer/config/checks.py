"""The one way a config value is refused: a ConfigError naming the key, the value and what is allowed."""

from __future__ import annotations

from typing import Any

from trainer.errors import ConfigError


def require(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {allowed}")
