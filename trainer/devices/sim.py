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

#: A directory of stand-in vendor tools (``nvidia-smi``, ``npu-smi``, ``hccn_tool``) that simulated families
#: read as the family they mimic would read the real ones; unset, they read none.
SIM_VENDOR_TOOLS_ENV = "TRAINER_SIM_VENDOR_TOOLS"
_READERS = {"cuda": vendor.cuda_health, "npu": vendor.ascend_health}

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

    def vendor_health(self, device: torch.device, timeout_s: float) -> VendorReport:
        directory = os.environ.get(SIM_VENDOR_TOOLS_ENV)
        reader = _READERS.get(self.mimics)
        if reader is None or not directory:
            why = f"simulated family {self.name}: set {SIM_VENDOR_TOOLS_ENV} to a directory of stand-in tools"
            return VendorReport(skipped={"vendor tools": why})
        return reader(self.local_rank, timeout_s, directory)

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
