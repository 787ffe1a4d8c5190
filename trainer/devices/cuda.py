"""NVIDIA GPUs through CUDA and NCCL."""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

import torch

from trainer.devices.accelerator import AcceleratorAdapter


class CudaAdapter(AcceleratorAdapter):
    name = "cuda"

    def _load_module(self) -> ModuleType:
        return torch.cuda

    def torch_device_type(self) -> str:
        return "cuda"

    def distributed_backend(self) -> str:
        return "nccl"

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
