"""Where ``checkpoint.dir`` points: a local or shared path (``file://`` accepted) or an object store URL
(``s3://bucket/prefix``, see :mod:`trainer.checkpoint.objects`); the URL checked before a run starts, its
fsspec filesystem, and the credentials of ``checkpoint.storage_options`` kept out of everything written."""

from __future__ import annotations

import re
from typing import Any

from trainer.errors import ConfigError

#: URL schemes ``checkpoint.dir`` accepts besides a local path (``file://`` is one).
SCHEMES = ("s3",)
#: storage_options keys whose values are credentials: never written to a manifest, the journal or a log.
_SECRET = re.compile(r"(secret|password|token|credential|key)", re.IGNORECASE)
_NOT_SECRET = {"endpoint_url", "region_name", "client_kwargs", "config_kwargs"}


def scheme(where: str) -> str | None:
    """The URL scheme of ``checkpoint.dir`` (``s3``), or None for a local path (``file://`` included)."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", where)
    if match is None or match.group(1).lower() == "file":
        return None
    return match.group(1).lower()


def local_path(where: str) -> str:
    """``where`` without a ``file://`` prefix."""
    return where[len("file://") :] if where.lower().startswith("file://") else where


def check_location(where: str) -> None:
    """Refuse a ``checkpoint.dir`` URL this toolkit cannot commit to safely, naming what is allowed."""
    kind = scheme(where)
    if kind is None:
        return
    if kind not in SCHEMES:
        raise ConfigError(
            f"checkpoint.dir={where!r}: the scheme {kind}:// is not supported; allowed: a local or shared path, "
            "file://path, or s3://bucket/prefix (object storage with conditional writes)"
        )
    bucket = where.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"checkpoint.dir={where!r} names no bucket; allowed: s3://bucket[/prefix]")


def redact(value: Any) -> Any:
    """``value`` (a config container) with every credential under a ``storage_options`` mapping replaced by
    ``"<redacted>"``: keys such as ``key``, ``secret``, ``token``, ``password``, at any depth."""
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if k == "storage_options" and isinstance(v, dict):
                out[k] = _redact_options(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _redact_options(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = _redact_options(v)
        elif str(k) not in _NOT_SECRET and _SECRET.search(str(k)) and v is not None:
            out[k] = "<redacted>"
        else:
            out[k] = v
    return out


def filesystem(where: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem of ``where`` and the path inside it; a clear error when s3fs is missing."""
    try:
        import fsspec.core
    except ImportError as exc:  # pragma: no cover - fsspec comes with the dependencies
        raise ConfigError(f"checkpoint.dir={where!r} needs fsspec ({exc})") from None
    try:
        fs, path = fsspec.core.url_to_fs(where, **dict(storage_options or {}))
    except ImportError as exc:
        raise ConfigError(
            f"checkpoint.dir={where!r} needs s3fs, which is not installed ({exc}); allowed: "
            "pip install 'fleet-trainer[s3]', or a local path"
        ) from None
    except TypeError as exc:
        raise ConfigError(
            f"checkpoint.storage_options are not accepted by the {scheme(where)}:// filesystem ({exc})"
        ) from None
    return fs, str(path).rstrip("/")
