"""The host CPU as a device family (gloo collectives)."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch

from trainer.devices import timeouts
from trainer.devices.base import DeviceAdapter
from trainer.devices.timeouts import BackendTimeouts
from trainer.devices.vendor import VendorReport


class CpuAdapter(DeviceAdapter):
    """Always available; one logical device per process."""

    name = "cpu"

    def is_available(self) -> bool:
        return True

    def unavailable_reason(self) -> str | None:
        return None

    def device_count(self) -> int:
        return 1

    def bind(self, local_rank: int) -> torch.device:
        # Every local rank shares the host; there is no device to select.
        return torch.device("cpu")

    def torch_device_type(self) -> str:
        return "cpu"

    def distributed_backend(self) -> str:
        return "gloo"

    def backend_timeouts(self, collective_timeout_s: float) -> BackendTimeouts:
        return timeouts.gloo(collective_timeout_s)

    def vendor_health(
        self, device: torch.device, timeout_s: float, directory: str | None = None
    ) -> VendorReport:
        return VendorReport(skipped={"vendor tools": f"the {self.name} family has none"})

    def ray_resource(self) -> str:
        return "CPU"

    def visible_devices_env(self) -> str | None:
        return None

    def synchronize(self, device: torch.device) -> None:
        # CPU kernels run synchronously: nothing is queued.
        return None

    def memory_stats(self, device: torch.device) -> dict[str, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        stats = {"total": page * os.sysconf("SC_PHYS_PAGES")}
        with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as f:
            stats["allocated"] = int(f.read().split()[1]) * page
        return stats

    def supported_dtypes(self) -> frozenset[torch.dtype]:
        return frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

    def rng_key(self) -> str:
        return self.name

    def get_rng_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        torch.set_rng_state(state["cpu"])

    def seed(self, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)

    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=dtype)

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", enabled=enabled)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "torch": torch.__version__,
            "device_type": "cpu",
            "processor": platform.machine(),
            "threads": torch.get_num_threads(),
        }
