"""Where each tensor lives in a checkpoint's DCP files, so that plain torch code can read them too.

Since manifest format 3 the tensors are saved as DCP's standard nested state dict::

    {"model": model.state_dict(),
     "optimizer": {"state": {fqn: {"exp_avg": .., "step": ..}}},
     "extra": {name: tensor}}

which DCP flattens to dotted keys: ``model.tok_emb.weight``, ``optimizer.state.tok_emb.weight.exp_avg``,
``extra.ema``. The model half is what ``dcp.load({"model": model.state_dict()}, checkpoint_id=...)`` asks
for, and the optimizer half is the ``state`` of ``get_optimizer_state_dict`` under the key torchtitan uses;
the optimizer's hyper-parameters are JSON in the manifest, as every non-tensor value is (see ``safe_dcp``).

The toolkit names a tensor by its flat dotted key everywhere (capture, snapshots, the manifest), which is the
key DCP writes, so the manifest's ``tensors`` match the DCP metadata one for one. Formats 1 and 2 wrote flat
keys ``model/<fqn>``, ``optim/<fqn>/<name>`` and ``extra/<name>``; :func:`on_disk` and :func:`from_disk`
translate, so those checkpoints still load.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.errors import CheckpointIncompatibleError

MODEL = "model"
OPTIMIZER = "optimizer"
EXTRA = "extra"
_MODEL = MODEL + "."
_OPTIM = OPTIMIZER + ".state."
_EXTRA = EXTRA + "."
#: Manifest formats whose DCP files use the flat ``model/…`` keys.
FLAT_FORMATS = (1, 2)
_FLAT_MODEL, _FLAT_OPTIM, _FLAT_EXTRA = "model/", "optim/", "extra/"


def model_key(fqn: str) -> str:
    return _MODEL + fqn


def optimizer_key(fqn: str, name: str) -> str:
    """The key of optimizer state ``name`` of parameter ``fqn``; the name is the last dotted part."""
    if "." in name:
        raise CheckpointIncompatibleError(
            f"optimizer state {fqn}[{name!r}]: a state name with a '.' cannot be told apart from the "
            "parameter name in DCP's dotted keys"
        )
    return f"{_OPTIM}{fqn}.{name}"


def extra_key(name: str) -> str:
    return _EXTRA + name


def model_fqn(key: str) -> str | None:
    """The parameter or buffer FQN of a model key; None for any other key."""
    return key.removeprefix(_MODEL) if key.startswith(_MODEL) else None


def optimizer_entry(key: str) -> tuple[str, str] | None:
    """``(parameter fqn, state name)`` of an optimizer key; None for any other key."""
    if not key.startswith(_OPTIM):
        return None
    fqn, name = key.removeprefix(_OPTIM).rsplit(".", 1)
    return fqn, name


def extra_name(key: str) -> str | None:
    """The task's name of an extra-state key; None for any other key."""
    return key.removeprefix(_EXTRA) if key.startswith(_EXTRA) else None


def nested(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The flat keyed tensors as the nested dict DCP is given to save, so that its metadata records the
    nesting (``planner_data``) as for any ``dcp.save({"model": ..}, ..)`` and tools that rebuild the
    structure (``dcp_to_torch_save``) see ``model`` / ``optimizer`` / ``extra``."""
    model: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if (fqn := model_fqn(key)) is not None:
            model[fqn] = tensor
        elif (entry := optimizer_entry(key)) is not None:
            state.setdefault(entry[0], {})[entry[1]] = tensor
        elif (name := extra_name(key)) is not None:
            extra[name] = tensor
        else:
            raise ValueError(f"{key!r} is not a model, optimizer or extra key")
    return {MODEL: model, OPTIMIZER: {"state": state}, EXTRA: extra}


def on_disk(key: str, format_version: int) -> str:
    """The key under which a checkpoint of ``format_version`` stores the tensor named ``key``."""
    if format_version not in FLAT_FORMATS:
        return key
    if (fqn := model_fqn(key)) is not None:
        return _FLAT_MODEL + fqn
    if (entry := optimizer_entry(key)) is not None:
        return f"{_FLAT_OPTIM}{entry[0]}/{entry[1]}"
    if (name := extra_name(key)) is not None:
        return _FLAT_EXTRA + name
    return key


def from_disk(key: str, format_version: int) -> str:
    """The current name of the tensor a checkpoint of ``format_version`` stores under ``key``."""
    if format_version not in FLAT_FORMATS:
        return key
    if key.startswith(_FLAT_MODEL):
        return model_key(key.removeprefix(_FLAT_MODEL))
    if key.startswith(_FLAT_OPTIM):
        fqn, name = key.removeprefix(_FLAT_OPTIM).rsplit("/", 1)
        return f"{_OPTIM}{fqn}.{name}"
    if key.startswith(_FLAT_EXTRA):
        return extra_key(key.removeprefix(_FLAT_EXTRA))
    return key
