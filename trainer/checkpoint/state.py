"""Device-neutral training state: what a checkpoint holds, independent of the family that wrote it.

Tensors (model parameters and buffers, optimizer state, a task's extra tensors) go to DCP as CPU tensors
under DCP's dotted keys ``model.<fqn>``, ``optimizer.state.<fqn>.<name>`` and ``extra.<name>`` (see
``layout``, which also reads the flat keys of older checkpoints). Everything else — optimizer
hyper-parameters, GradScaler state, the LR scheduler's state, a task's extra JSON values — is plain JSON for
the manifest. Flags that only describe how a family runs the optimizer
(``fused``, ``foreach``, ``capturable``, ``differentiable``) are not saved: on load the restoring family's
own flags are kept, so a checkpoint from a fused CUDA AdamW loads into a CPU AdamW and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from trainer.checkpoint import layout
from trainer.errors import CheckpointIncompatibleError

#: Optimizer param-group keys that depend on the device family, not on the training trajectory.
DEVICE_FLAGS = ("fused", "foreach", "capturable", "differentiable")


@dataclass
class PortableState:
    """One rank's view of the training state, ready to be written."""

    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    #: ``{"scheduler": <its state_dict>, "extra": <the task's JSON values>}`` (the manifest's ``task_state``).
    task_state: dict[str, Any] = field(default_factory=dict)


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return [_json_value(v, where) for v in value]
    if value is None or isinstance(value, bool | int | float | str | list):
        return value
    raise CheckpointIncompatibleError(f"{where}: {type(value).__name__} values cannot be stored portably")


def json_tree(value: Any, where: str) -> Any:
    """``value`` as JSON (tuples become lists); raise naming ``where`` for anything JSON cannot hold."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [json_tree(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: json_tree(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointIncompatibleError(
        f"{where} is a {type(value).__name__}; allowed: tensors at the top level, else JSON values "
        "(numbers, strings, booleans, None, lists and string-keyed dicts of them)"
    )


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> PortableState:
    """The current state with tensors *not yet copied* (they alias the live parameters and optimizer state).

    Callers that keep training while the state is written must copy the tensors first (see the async
    writer); a synchronous save can write them directly. ``model`` is the bare module (not a DDP wrapper).
    ``extra`` is a task's extra state: its tensors go with the others, its other values must be JSON.
    Keys are the parameter FQNs that DCP's ``get_optimizer_state_dict`` uses, without its per-call
    overhead: this runs inside the time a save blocks training.
    """
    tensors = {layout.model_key(fqn): t.detach() for fqn, t in model.state_dict().items()}
    names = {id(p): fqn for fqn, p in model.named_parameters()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        fqns = []
        for param in group["params"]:
            fqn = names[id(param)]
            fqns.append(fqn)
            for name, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise CheckpointIncompatibleError(
                        f"optimizer state {fqn}.{name} is a {type(value).__name__}; only tensors are supported"
                    )
                tensors[layout.optimizer_key(fqn, name)] = value.detach()
        meta = {
            k: _json_value(v, f"optimizer param_groups[{i}].{k}")
            for k, v in group.items()
            if k not in DEVICE_FLAGS and k != "params"
        }
        groups.append({**meta, "params": fqns})
    task_state: dict[str, Any] = {"extra": {}}
    if scheduler is not None:
        task_state["scheduler"] = json_tree(scheduler.state_dict(), "the LR scheduler's state_dict()")
    for key, value in (extra or {}).items():
        if isinstance(value, torch.Tensor):
            tensors[layout.extra_key(key)] = value.detach()
        else:
            task_state["extra"][key] = json_tree(value, f"extra state {key!r}")
    return PortableState(
        tensors=tensors,
        optimizer={"class": type(optimizer).__name__, "param_groups": groups},
        scaler={k: _json_value(v, f"scaler.{k}") for k, v in scaler.state_dict().items()},
        task_state=task_state,
    )


def template(
    model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Empty CPU tensors of the shapes and dtypes :func:`capture` would produce, for loading into; a sharded
    model's (FSDP) are empty DTensors like its own, so that a load reads only this rank's slices."""
    # DCP's helper materialises the state of an optimizer that has not stepped yet (a fresh one on load).
    get_optimizer_state_dict(model, optimizer)
    tensors = {k: v for k, v in (extra or {}).items() if isinstance(v, torch.Tensor)}
    live = capture(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), extra=tensors).tensors
    return {
        k: torch.empty_like(t)
        if isinstance(t, DTensor)
        else torch.empty(t.shape, dtype=t.dtype, device="cpu")
        for k, t in live.items()
    }


def check_compatible(
    expected: dict[str, torch.Tensor], saved: dict[str, dict[str, Any]], origin: str
) -> None:
    """Raise naming every missing, unexpected or reshaped key between the live state and a checkpoint."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    reshaped = sorted(
        f"{k}: checkpoint {saved[k].get('shape')} vs model {list(expected[k].shape)}"
        for k in set(expected) & set(saved)
        if list(saved[k].get("shape", [])) != list(expected[k].shape)
    )
    if missing or unexpected or reshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointIncompatibleError(f"{origin} does not fit this model/optimizer — " + "; ".join(parts))


def apply(
    loaded: dict[str, torch.Tensor],
    optimizer_meta: dict[str, Any],
    scaler_state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    task_state: dict[str, Any] | None = None,
    scheduler: Any | None = None,
) -> dict[str, Any]:
    """Put loaded CPU tensors and JSON state into the live model, optimizer, scaler and scheduler; returns
    the task's extra state (its tensors and JSON values) for ``Task.load_extra_state``."""
    model_sd: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in loaded.items():
        if (fqn := layout.model_fqn(key)) is not None:
            model_sd[fqn] = value
        elif (entry := layout.optimizer_entry(key)) is not None:
            state.setdefault(entry[0], {})[entry[1]] = value
        elif (name := layout.extra_name(key)) is not None:
            tensors[name] = value
    set_model_state_dict(model, model_sd)  # type: ignore[arg-type]
    live_groups: list[dict[str, Any]] = list(get_optimizer_state_dict(model, optimizer)["param_groups"])  # type: ignore[arg-type]
    saved_groups = optimizer_meta.get("param_groups", [])
    if len(saved_groups) != len(live_groups):
        raise CheckpointIncompatibleError(
            f"checkpoint has {len(saved_groups)} optimizer param groups, the optimizer has {len(live_groups)}"
        )
    groups = []
    for live, saved in zip(live_groups, saved_groups, strict=True):
        if list(saved["params"]) != list(live["params"]):
            raise CheckpointIncompatibleError(
                "optimizer param groups hold different parameters than the checkpoint"
            )
        merged = dict(live)
        for k, v in saved.items():
            if k != "params" and k in live:
                merged[k] = tuple(v) if isinstance(live[k], tuple) else v
        groups.append(merged)
    osd: Any = {"state": state, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd)

    if scaler.is_enabled() and scaler_state:
        scaler.load_state_dict(scaler_state)
    task_state = task_state or {}
    if scheduler is not None and "scheduler" in task_state:
        scheduler.load_state_dict(task_state["scheduler"])
    return {**task_state.get("extra", {}), **tensors}
