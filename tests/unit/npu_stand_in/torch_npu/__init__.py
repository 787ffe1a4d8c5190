"""STAND-IN for torch_npu, used by tests/unit/test_npu_adapter.py. NOT Ascend hardware.

It reproduces the API surface the NPU adapter relies on — the "npu" device type, a torch.npu device module
(the functions named in NPU_API) and an "hccl" process-group backend — backed by the CPU and gloo. CANN and
HCCL are not involved.

Checked against torch_npu-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (PyPI torch-npu 2.13.0, the release
for torch 2.13.0) by tests/unit/test_npu_wheel_api.py: every name in NPU_API exists in that wheel's
torch_npu.npu with these parameters, and the registrations below are the calls its torch_npu/_init makes.
Deliberate differences: the hccl backend also takes CPU tensors (devices=["cpu", "npu"]; the real one only
"npu"), and ``generator`` and DEVICE_COUNT are the stand-in's own.
"""

import types

import torch
import torch.distributed as dist

__version__ = "0.0.0+standin"
DEVICE_COUNT = 2
#: The torch.npu functions this stand-in provides (the adapter's and the tests' calls).
NPU_API = (
    "is_available",
    "device_count",
    "set_device",
    "current_device",
    "synchronize",
    "memory_allocated",
    "memory_reserved",
    "get_device_properties",
    "get_device_name",
    "get_rng_state",
    "set_rng_state",
    "manual_seed_all",
)

torch.utils.rename_privateuse1_backend("npu")

generator = torch.Generator()  # stands in for the NPU's on-device generator
_current = [0]


def _index(device=None):
    if device is None:
        return _current[0]
    index = torch.device("npu", device).index if isinstance(device, int) else torch.device(device).index
    return _current[0] if index is None else index


def is_available():
    return True


def device_count():
    return DEVICE_COUNT


def set_device(device):
    index = _index(device)
    if not 0 <= index < DEVICE_COUNT:
        raise RuntimeError(f"invalid device ordinal {index}")
    _current[0] = index


def current_device():
    return _current[0]


def synchronize(device=None):
    _index(device)


def memory_allocated(device=None):
    return 1024 * (_index(device) + 1)


def memory_reserved(device=None):
    return 4096 * (_index(device) + 1)


def get_device_properties(device_name=None):
    return types.SimpleNamespace(name="Ascend910B (stand-in)", total_memory=64 * 2**30)


def get_device_name(device_name=None):
    return get_device_properties(device_name).name


def get_rng_state(device="npu"):
    return generator.get_state()


def set_rng_state(new_state, device="npu"):
    generator.set_state(new_state)


def manual_seed_all(seed):
    generator.manual_seed(seed)


npu = types.ModuleType("torch.npu")
for _name in NPU_API:
    setattr(npu, _name, globals()[_name])
torch._register_device_module("npu", npu)


def _create_hccl(dist_backend_opts, pg_options):
    opts = dist_backend_opts
    return dist.ProcessGroupGloo(opts.store, opts.group_rank, opts.group_size, opts.timeout)


dist.Backend.register_backend("hccl", _create_hccl, extended_api=True, devices=["cpu", "npu"])
