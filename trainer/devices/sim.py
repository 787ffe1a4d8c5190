"""Simulated accelerator families: CPU-backed stand-ins that make a mixed fleet testable on one host.

A simulated family computes on the CPU with gloo, but has its own name, its own Ray custom resource (so a
local Ray can advertise e.g. 4 ``sim_npu`` and 4 ``sim_cuda`` slots), its own RNG key (so a move between
families exercises RNG re-derivation) and the dtype set of the family it mimics.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from trainer.devices import vendor
from trainer.devices.cpu import CpuAdapter
from trainer.devices.vendor import VendorReport

#: The simulated devices this process may use, as CUDA_VISIBLE_DEVICES is for NVIDIA GPUs: set per worker by
#: the worker group (its placement-group bundle), read by the stand-in vendor tools' readers.
SIM_VISIBLE_DEVICES_ENV = "TRAINER_SIM_VISIBLE_DEVICES"

_MIMIC_DTYPES: dict[str, frozenset[torch.dtype]] = {
    "npu": frozenset({torch.float32, torch.float16, torch.bfloat16}),
    "cuda": frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16}),
    "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16}),
}


class SimulatedAdapter(CpuAdapter):
    """A CPU-backed family called ``name`` that mimics the real family ``mimics``."""

    def __init__(self, name: str, mimics: str) -> None:
        if mimics not in _MIMIC_DTYPES:
            raise ValueError(
                f"simulated family {name!r}: mimics={mimics!r}; allowed: {sorted(_MIMIC_DTYPES)}"
            )
        self.name = name  # type: ignore[misc]  # per-instance family name
        self.mimics = mimics
        #: The local rank this process bound: the index of the simulated device (CPU tensors carry none).
        self.local_rank = 0

    def bind(self, local_rank: int) -> torch.device:
        self.local_rank = local_rank
        return super().bind(local_rank)

    def visible_devices_env(self) -> str | None:
        return SIM_VISIBLE_DEVICES_ENV

    def vendor_health(
        self, device: torch.device, timeout_s: float, directory: str | None = None
    ) -> VendorReport:
        """The mimicked family's tools, read from ``directory`` only (stand-ins): a simulated device has no
        real tools, and the host's real ones would describe another device."""
        if self.mimics not in ("cuda", "npu") or not directory:
            why = (
                f"simulated family {self.name}: set probes.vendor_tools_dir to a directory of stand-in tools"
            )
            return VendorReport(skipped={"vendor tools": why})
        physical = vendor.physical_device(self.local_rank, os.environ.get(SIM_VISIBLE_DEVICES_ENV))
        if self.mimics == "cuda":
            return vendor.cuda_health(physical, timeout_s, directory)
        if isinstance(physical, str):
            return VendorReport(skipped={"vendor tools": f"{SIM_VISIBLE_DEVICES_ENV} entry {physical!r}"})
        return vendor.ascend_health(physical, timeout_s, directory)

    def ray_resource(self) -> str:
        return self.name

    def supported_dtypes(self) -> frozenset[torch.dtype]:
        return _MIMIC_DTYPES[self.mimics]

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts["simulates"] = self.mimics
        return facts


#: Simulated families registered by default: name → the real family each mimics.
SIMULATED_FAMILIES: dict[str, str] = {"sim_npu": "npu", "sim_cuda": "cuda"}
