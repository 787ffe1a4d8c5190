"""Huawei Ascend NPUs through torch_npu (CANN) and HCCL.

``torch_npu`` is imported lazily, on the first call that needs it, and never at module import: installed
without the CANN toolkit it makes ``import torch_npu`` raise (a RuntimeError or OSError from loading the
CANN libraries, not only ImportError), and with torch's device-backend autoload it can even break
``import torch``. Every such failure turns into "unavailable, because …".

What is tested here: the wiring against torch_npu's API surface (``torch.npu`` device module, the ``hccl``
backend, ``ASCEND_RT_VISIBLE_DEVICES``), using a stand-in ``torch_npu`` module in a subprocess. CANN, HCCL
and Ascend hardware themselves are not exercised by this project's tests.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Any

import torch

from trainer.devices import timeouts, vendor
from trainer.devices.accelerator import AcceleratorAdapter
from trainer.devices.timeouts import BackendTimeouts
from trainer.devices.vendor import VendorReport


class NpuAdapter(AcceleratorAdapter):
    name = "npu"

    def _load_module(self) -> ModuleType:
        # Importing torch_npu registers the "npu" device type, torch.npu and the "hccl" backend.
        importlib.import_module("torch_npu")
        return torch.get_device_module("npu")

    def torch_device_type(self) -> str:
        return "npu"

    def distributed_backend(self) -> str:
        return "hccl"

    def backend_timeouts(self, collective_timeout_s: float) -> BackendTimeouts:
        return timeouts.hccl(collective_timeout_s)

    def vendor_health(
        self, device: torch.device, timeout_s: float, directory: str | None = None
    ) -> VendorReport:
        physical = vendor.physical_device(device.index or 0, os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
        if isinstance(physical, str):
            return VendorReport(skipped={"vendor tools": f"ASCEND_RT_VISIBLE_DEVICES entry {physical!r}"})
        return vendor.ascend_health(physical, timeout_s, vendor.search_path(directory))

    def ray_resource(self) -> str:
        return "NPU"

    def visible_devices_env(self) -> str | None:
        return "ASCEND_RT_VISIBLE_DEVICES"

    def supported_dtypes(self) -> frozenset[torch.dtype]:
        # Ascend's cube units compute fp16/bf16/fp32; fp64 falls back to slow or missing kernels.
        return frozenset({torch.float32, torch.float16, torch.bfloat16})

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        with contextlib.suppress(ImportError, RuntimeError, OSError, AttributeError):
            torch_npu = importlib.import_module("torch_npu")
            facts["torch_npu"] = str(getattr(torch_npu, "__version__", "unknown"))
        return facts
