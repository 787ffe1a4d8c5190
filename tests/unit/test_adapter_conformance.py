"""Every registered device family passes the adapter conformance suite; the registry keeps its contract.

Families unavailable on this machine (cuda, npu on a CPU host) still run the checks that need no device;
the rest skip, naming the reason. The last section feeds deliberately broken adapters to the suite's checks
to show that each one can fail.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from trainer.devices import ADAPTERS, CpuAdapter, DeviceAdapter, family_names, get_adapter, register
from trainer.devices import registry as registry_module
from trainer.devices.accelerator import AcceleratorAdapter
from trainer.errors import ConfigError, DeviceUnavailableError, UnknownDeviceFamilyError
from trainer.testing.adapter_conformance import AdapterConformance


class TestRegisteredFamilies(AdapterConformance):
    @pytest.fixture(params=sorted(ADAPTERS))
    def adapter(self, request: pytest.FixtureRequest) -> DeviceAdapter:
        return get_adapter(request.param)


# Registry


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Undo registrations a test makes, so the process-wide registry is the same for the next test."""
    saved = dict(ADAPTERS)
    yield
    ADAPTERS.clear()
    ADAPTERS.update(saved)


class _DownAdapter(CpuAdapter):
    """A CPU adapter that reports itself unavailable."""

    name = "down"

    def is_available(self) -> bool:
        return False

    def unavailable_reason(self) -> str | None:
        return "simulated outage"


def test_builtin_families_are_registered() -> None:
    assert {"cpu", "cuda", "npu", "sim_npu", "sim_cuda"} <= set(ADAPTERS)
    assert family_names() == [*sorted(ADAPTERS), "auto"]


def test_unknown_family_raises_and_lists_allowed_names() -> None:
    with pytest.raises(UnknownDeviceFamilyError) as info:
        get_adapter("tpu")
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    assert "'tpu'" in message
    for name in family_names():
        assert name in message


@pytest.mark.usefixtures("restore_registry")
def test_register_refuses_duplicates_unless_replace() -> None:
    original = ADAPTERS["cpu"]
    with pytest.raises(ValueError, match="already registered"):
        register("cpu", _DownAdapter)
    assert ADAPTERS["cpu"] is original
    register("cpu", original, replace=True)
    assert ADAPTERS["cpu"] is original


@pytest.mark.parametrize("name", ["", "my-npu", "a b", "npu:0"])
def test_register_refuses_malformed_names(name: str) -> None:
    with pytest.raises(ValueError, match="allowed: lower-case letters"):
        register(name, CpuAdapter)
    assert name not in ADAPTERS


@pytest.mark.usefixtures("restore_registry")
def test_get_adapter_refuses_a_factory_whose_adapter_has_another_name() -> None:
    register("mislabelled", CpuAdapter)
    with pytest.raises(TypeError, match="reports name 'cpu'"):
        get_adapter("mislabelled")


def test_auto_picks_the_first_available_family_in_order() -> None:
    expected = next(name for name in registry_module.AUTO_ORDER if get_adapter(name).is_available())
    assert get_adapter("auto").name == expected


def test_auto_resolves_to_cpu_without_npu_and_cuda() -> None:
    available = [name for name in ("npu", "cuda") if get_adapter(name).is_available()]
    if available:
        pytest.skip(f"{available} available here; auto picks it, not cpu")
    assert get_adapter("auto").name == "cpu"


@pytest.mark.usefixtures("restore_registry")
def test_auto_with_nothing_available_names_each_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    register("down", _DownAdapter)
    monkeypatch.setattr(registry_module, "AUTO_ORDER", ("down", "not_registered"))
    with pytest.raises(DeviceUnavailableError, match="down: simulated outage"):
        get_adapter("auto")


def _stub_methods(names: frozenset[str]) -> dict[str, Any]:
    return {name: lambda self, *args, **kwargs: None for name in names}


@pytest.mark.parametrize("missing", sorted(DeviceAdapter.__abstractmethods__))
def test_adapter_missing_an_abstract_method_cannot_be_instantiated(missing: str) -> None:
    complete = type(
        "Complete", (DeviceAdapter,), {"name": "complete", **_stub_methods(DeviceAdapter.__abstractmethods__)}
    )
    complete()  # the control: with every method defined, instantiation works
    partial = type("Partial", (DeviceAdapter,), _stub_methods(DeviceAdapter.__abstractmethods__ - {missing}))
    with pytest.raises(TypeError, match=missing):
        partial()


def test_accelerator_adapter_requires_load_module() -> None:
    assert "_load_module" in AcceleratorAdapter.__abstractmethods__


# The suite's checks fail on adapters that break the contract (and pass on the plain CPU adapter).


class _BadName(CpuAdapter):
    name = "My-CPU"


class _RaisingProbe(CpuAdapter):
    def is_available(self) -> bool:
        raise RuntimeError("driver exploded")


class _ReasonWhileAvailable(CpuAdapter):
    def unavailable_reason(self) -> str | None:
        return "stale reason"


class _BackendTypo(CpuAdapter):
    def distributed_backend(self) -> str:
        return "glo"


class _NoFloat32(CpuAdapter):
    def supported_dtypes(self) -> frozenset[torch.dtype]:
        return frozenset({torch.bfloat16, torch.int8})


class _OpaqueDescribe(CpuAdapter):
    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "device": torch.device("cpu")}


class _RestoreIgnored(CpuAdapter):
    def set_rng_state(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        return None


class _SeedIgnored(CpuAdapter):
    def seed(self, seed: int, device: torch.device) -> None:
        return None


class _AlwaysAutocast(CpuAdapter):
    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16)


class _AutocastIgnored(CpuAdapter):
    def autocast(self, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()


class _ScalerAlwaysOn(CpuAdapter):
    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", enabled=True)


BROKEN: list[tuple[type[DeviceAdapter], str, dict[str, Any]]] = [
    (_BadName, "test_name_is_a_registry_key", {}),
    (_RaisingProbe, "test_is_available_returns_bool_and_never_raises", {}),
    (_ReasonWhileAvailable, "test_unavailable_reason_is_none_iff_available", {}),
    (_BackendTypo, "test_distributed_backend_is_known", {}),
    (_NoFloat32, "test_supported_dtypes_are_floating_and_include_float32", {}),
    (_OpaqueDescribe, "test_describe_is_json_and_names_the_family", {}),
    (_RestoreIgnored, "test_rng_state_round_trips", {}),
    (_SeedIgnored, "test_seed_is_deterministic", {}),
    (_AlwaysAutocast, "test_full_precision_autocast_is_a_no_op", {"dtype": None}),
    (_AutocastIgnored, "test_low_precision_autocast_computes_in_that_dtype", {"dtype": torch.bfloat16}),
    (_ScalerAlwaysOn, "test_grad_scaler_disabled_is_a_pass_through", {}),
]


def _run_check(check: str, adapter: DeviceAdapter, **extra: Any) -> None:
    """Call one of the suite's test methods directly, supplying the fixtures it asks for."""
    method = getattr(AdapterConformance(), check)
    available = {"adapter": adapter, "device": torch.device("cpu"), **extra}
    kwargs = {name: available[name] for name in inspect.signature(method).parameters}
    with torch.random.fork_rng(devices=[]):
        method(**kwargs)


@pytest.mark.parametrize(("broken", "check", "extra"), BROKEN, ids=[cls.__name__ for cls, _, _ in BROKEN])
def test_conformance_check_fails_on_a_broken_adapter(
    broken: type[DeviceAdapter], check: str, extra: dict[str, Any]
) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        _run_check(check, broken(), **extra)


@pytest.mark.parametrize(("check", "extra"), [(c, e) for _, c, e in BROKEN], ids=[c for _, c, _ in BROKEN])
def test_conformance_check_passes_on_the_cpu_adapter(check: str, extra: dict[str, Any]) -> None:
    _run_check(check, CpuAdapter(), **extra)
