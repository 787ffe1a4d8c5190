"""Simulated accelerator families: CPU-backed stand-ins that make a mixed fleet testable on one host.

A simulated family computes on the CPU with gloo, but has its own name, its own Ray custom resource (so a
local Ray can advertise e.g. 4 ``sim_npu`` and 4 ``sim_cuda`` slots), its own RNG key (so a move between
families exercises RNG re-derivation) and the dtype set of the family it mimics.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.devices.cpu import CpuAdapter

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
