"""Shared implementation for families reached through ``torch.get_device_module`` (CUDA, NPU).

Family-specific facts (backend, Ray resource, env var, dtypes, how the module is made importable) stay in
the subclasses; everything here is the device-module API both families implement.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from types import ModuleType
from typing import Any

import torch

from trainer.devices.base import DeviceAdapter
from trainer.errors import DeviceUnavailableError


class AcceleratorAdapter(DeviceAdapter):
    """A family whose tensors live on ``torch.device(<type>, index)`` and whose module is ``torch.<type>``."""

    @abstractmethod
    def _load_module(self) -> ModuleType:
        """Import whatever the family needs and return its device module; raise on any failure."""

    def _module_or_reason(self) -> tuple[ModuleType | None, str | None]:
        try:
            module = self._load_module()
        except Exception as exc:  # a broken vendor stack must read as "unavailable", never crash auto
            return None, f"{type(exc).__name__}: {exc}"
        try:
            if not module.is_available():
                return module, f"torch.{self.torch_device_type()}.is_available() is False"
            if module.device_count() < 1:
                return module, f"no {self.torch_device_type()} device visible"
        except Exception as exc:  # driver present but broken
            return module, f"{type(exc).__name__}: {exc}"
        return module, None

    def _module(self) -> ModuleType:
        module, reason = self._module_or_reason()
        if reason is not None or module is None:
            raise DeviceUnavailableError(f"device family {self.name!r} is unavailable: {reason}")
        return module

    def is_available(self) -> bool:
        return self._module_or_reason()[1] is None

    def unavailable_reason(self) -> str | None:
        return self._module_or_reason()[1]

    def device_count(self) -> int:
        module, reason = self._module_or_reason()
        return 0 if module is None or reason is not None else int(module.device_count())

    def bind(self, local_rank: int) -> torch.device:
        module = self._module()
        count = module.device_count()
        if not 0 <= local_rank < count:
            raise DeviceUnavailableError(
                f"local rank {local_rank} has no {self.name} device: {count} visible "
                f"(check {self.visible_devices_env()} and the number of workers per node)"
            )
        module.set_device(local_rank)
        return torch.device(self.torch_device_type(), local_rank)

    def synchronize(self, device: torch.device) -> None:
        self._module().synchronize(device)

    def memory_stats(self, device: torch.device) -> dict[str, int]:
        module = self._module()
        stats = {
            "allocated": int(module.memory_allocated(device)),
            "reserved": int(module.memory_reserved(device)),
        }
        with contextlib.suppress(AttributeError, RuntimeError):
            stats["total"] = int(module.get_device_properties(device).total_memory)
        return stats

    def rng_key(self) -> str:
        return self.name

    def get_rng_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state(), self.name: self._module().get_rng_state(device).cpu()}

    def set_rng_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        torch.set_rng_state(state["cpu"])
        self._module().set_rng_state(state[self.name], device)

    def seed(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self._module().manual_seed_all(seed)

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.torch_device_type(), dtype=dtype)

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.torch_device_type(), enabled=enabled)

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "family": self.name,
            "torch": torch.__version__,
            "device_type": self.torch_device_type(),
            "backend": self.distributed_backend(),
        }
        module, reason = self._module_or_reason()
        if module is not None and reason is None:
            facts["device_count"] = int(module.device_count())
            with contextlib.suppress(AttributeError, RuntimeError, AssertionError):
                facts["device_name"] = str(module.get_device_name(0))
        else:
            facts["unavailable"] = reason
        return facts
