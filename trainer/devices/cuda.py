"""NVIDIA GPUs through CUDA and NCCL."""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Any

import torch

from trainer.devices import timeouts, vendor
from trainer.devices.accelerator import AcceleratorAdapter
from trainer.devices.timeouts import BackendTimeouts
from trainer.devices.vendor import VendorReport


class CudaAdapter(AcceleratorAdapter):
    name = "cuda"

    def _load_module(self) -> ModuleType:
        return torch.cuda

    def torch_device_type(self) -> str:
        return "cuda"

    def distributed_backend(self) -> str:
        return "nccl"

    def backend_timeouts(self, collective_timeout_s: float) -> BackendTimeouts:
        return timeouts.nccl(collective_timeout_s)

    def vendor_health(
        self, device: torch.device, timeout_s: float, directory: str | None = None
    ) -> VendorReport:
        physical = vendor.physical_device(device.index or 0, os.environ.get("CUDA_VISIBLE_DEVICES"))
        return vendor.cuda_health(physical, timeout_s, vendor.search_path(directory))

    def ray_resource(self) -> str:
        return "GPU"

    def visible_devices_env(self) -> str | None:
        return "CUDA_VISIBLE_DEVICES"

    def supported_dtypes(self) -> frozenset[torch.dtype]:
        dtypes = {torch.float32, torch.float64, torch.float16}
        with contextlib.suppress(RuntimeError, AssertionError):
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
                dtypes.add(torch.bfloat16)
        return frozenset(dtypes)

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts["cuda"] = torch.version.cuda
        with contextlib.suppress(RuntimeError, AttributeError):
            facts["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        return facts
