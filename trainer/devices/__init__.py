"""Device families. Importing this package registers the built-in ones."""

from __future__ import annotations

from functools import partial

from trainer.devices.base import DeviceAdapter
from trainer.devices.cpu import CpuAdapter
from trainer.devices.cuda import CudaAdapter
from trainer.devices.npu import NpuAdapter
from trainer.devices.registry import ADAPTERS, family_names, get_adapter, register, resolve_auto
from trainer.devices.sim import SIMULATED_FAMILIES, SimulatedAdapter

register("cpu", CpuAdapter)
register("cuda", CudaAdapter)
register("npu", NpuAdapter)
for _name, _mimics in SIMULATED_FAMILIES.items():
    register(_name, partial(SimulatedAdapter, _name, _mimics))

__all__ = [
    "ADAPTERS",
    "CpuAdapter",
    "CudaAdapter",
    "DeviceAdapter",
    "NpuAdapter",
    "SimulatedAdapter",
    "family_names",
    "get_adapter",
    "register",
    "resolve_auto",
]
