"""The contract every accelerator family implements.

Generic code (worker, checkpoint, probes) talks to a device family only through a :class:`DeviceAdapter`;
family quirks — backend name, the environment variable that hides devices, the Ray resource name, which
dtypes work, how RNG state is read — live in the adapter. Every method is abstract so that an adapter that
drifts from the contract fails at class creation, not in the middle of a run.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from trainer.devices.timeouts import BackendTimeouts
from trainer.devices.vendor import VendorReport


class DeviceAdapter(ABC):
    """One accelerator family (``cuda``, ``npu``, ``cpu``, or a simulated family).

    Instances are cheap and stateless; a worker process creates one, calls :meth:`bind` once with its local
    rank and uses the returned ``torch.device`` from then on.
    """

    #: Registry key and the name used in configs, checkpoints and metrics.
    name: ClassVar[str]

    @abstractmethod
    def is_available(self) -> bool:
        """Whether this process can use the family now. Never raises; see :meth:`unavailable_reason`."""

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why :meth:`is_available` is false (missing package, no device, driver error), else ``None``."""

    @abstractmethod
    def device_count(self) -> int:
        """Number of devices of this family visible to this process (0 when unavailable)."""

    @abstractmethod
    def bind(self, local_rank: int) -> torch.device:
        """Make ``local_rank``'s device current for this process and return it."""

    @abstractmethod
    def torch_device_type(self) -> str:
        """The ``torch.device`` type tensors of this family live on (``"cuda"``, ``"npu"``, ``"cpu"``)."""

    @abstractmethod
    def distributed_backend(self) -> str:
        """The ``torch.distributed`` backend for collectives on this family (nccl, hccl, gloo)."""

    @abstractmethod
    def backend_timeouts(self, collective_timeout_s: float) -> BackendTimeouts:
        """The process-group timeout and backend environment for a collective timeout of
        ``collective_timeout_s`` (derived from the measured step time); see :mod:`trainer.devices.timeouts`.
        Raises ``ValueError`` for a timeout that is not a positive number of seconds."""

    @abstractmethod
    def vendor_health(
        self, device: torch.device, timeout_s: float, directory: str | None = None
    ) -> VendorReport:
        """What the family's own health tools say about ``device`` (see :mod:`trainer.devices.vendor`), the
        tools looked for in ``directory`` first, then PATH. Never raises; tools absent from the host are
        listed in ``skipped`` with the reason."""

    @abstractmethod
    def ray_resource(self) -> str:
        """The Ray resource one worker of this family asks for (``GPU``, ``NPU``, ``CPU`` or a custom one)."""

    @abstractmethod
    def visible_devices_env(self) -> str | None:
        """The environment variable that restricts visible devices, or ``None`` where there is none."""

    @abstractmethod
    def synchronize(self, device: torch.device) -> None:
        """Block until every queued operation on ``device`` has finished (a host/device sync point)."""

    @abstractmethod
    def memory_stats(self, device: torch.device) -> dict[str, int]:
        """Bytes allocated / reserved / total on ``device``; keys missing where the family cannot tell."""

    @abstractmethod
    def supported_dtypes(self) -> frozenset[torch.dtype]:
        """Floating-point dtypes that train correctly on this family."""

    @abstractmethod
    def rng_key(self) -> str:
        """Key under which this family's RNG state is saved; states under another key are not restored."""

    @abstractmethod
    def get_rng_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every RNG state training depends on (host and device), as CPU uint8 tensors."""

    @abstractmethod
    def set_rng_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore states produced by :meth:`get_rng_state` of the same family."""

    @abstractmethod
    def seed(self, seed: int, device: torch.device) -> None:
        """Seed host and device generators; used when RNG state must be re-derived."""

    @abstractmethod
    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
        """A context manager running the forward pass in ``dtype`` (``None``: full precision, no-op)."""

    @abstractmethod
    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        """A gradient scaler for fp16 training on this family (``enabled=False``: a pass-through one)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable facts for checkpoint manifests and journals (versions, device names)."""
