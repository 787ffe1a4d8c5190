"""A pytest suite every :class:`~trainer.devices.base.DeviceAdapter` must pass.

The abstract base class only checks that each method exists; this suite checks that each one keeps its
contract (types, RNG round trips, autocast, JSON-serialisable facts). An adapter author subclasses
:class:`AdapterConformance` in their own test file and provides the adapter as a fixture::

    import pytest

    from trainer.testing.adapter_conformance import AdapterConformance


    class TestMyAdapter(AdapterConformance):
        @pytest.fixture
        def adapter(self):
            return MyAdapter()

Checks that need a usable device skip, naming the adapter's :meth:`unavailable_reason`, when
:meth:`is_available` is false; the rest (naming, probing, ``describe``) run everywhere, so an adapter for
hardware the CI lacks is still checked for what can be checked without it.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from trainer.devices.base import DeviceAdapter
from trainer.errors import DeviceUnavailableError

#: Registry keys: lower-case, starting with a letter (they appear in configs, paths and metric labels).
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
#: Backends accepted even where torch.distributed has not registered them (hccl comes with torch_npu).
KNOWN_BACKENDS = frozenset({"nccl", "hccl", "gloo"})
#: The keys :meth:`DeviceAdapter.memory_stats` may report.
MEMORY_KEYS = frozenset({"allocated", "reserved", "total"})
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def require_available(adapter: DeviceAdapter) -> None:
    """Skip the calling test, saying why, when ``adapter``'s family cannot be used in this process."""
    if not adapter.is_available():
        pytest.skip(f"device family {adapter.name!r} is unavailable here: {adapter.unavailable_reason()}")


def torch_can_autocast(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch itself autocasts ``device_type`` to ``dtype`` (it warns and disables autocast if not)."""
    try:
        if not torch.amp.is_autocast_available(device_type):
            return False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _draw(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw from the host generator and one from the device generator, both as CPU tensors."""
    return torch.rand(16), torch.rand(16, device=device).cpu()


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(a, b, strict=True)]


def _non_empty_str(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


class AdapterConformance:
    """Contract tests for one adapter; subclasses provide a fixture named ``adapter``."""

    @pytest.fixture
    def device(self, adapter: DeviceAdapter) -> torch.device:
        """Local rank 0's device; skips the test when the family is unavailable."""
        require_available(adapter)
        return adapter.bind(0)

    @pytest.fixture
    def keep_host_rng(self) -> Iterator[None]:
        """Restore the host generator afterwards, so RNG tests do not reseed the tests that follow."""
        with torch.random.fork_rng(devices=[]):
            yield

    # Naming and probing: no device needed.

    def test_name_is_a_registry_key(self, adapter: DeviceAdapter) -> None:
        assert isinstance(adapter.name, str) and NAME_PATTERN.fullmatch(adapter.name), (
            f"adapter name {adapter.name!r} must match {NAME_PATTERN.pattern!r} (used as the registry key)"
        )

    def test_is_available_returns_bool_and_never_raises(self, adapter: DeviceAdapter) -> None:
        try:
            available = adapter.is_available()
        except Exception as exc:
            pytest.fail(
                f"is_available() raised {exc!r}; it must return False and explain in unavailable_reason()"
            )
        assert type(available) is bool, f"is_available() returned {available!r}, not a bool"

    def test_unavailable_reason_is_none_iff_available(self, adapter: DeviceAdapter) -> None:
        available, reason = adapter.is_available(), adapter.unavailable_reason()
        if available:
            assert reason is None, f"available, yet unavailable_reason() is {reason!r}"
        else:
            assert _non_empty_str(reason), f"unavailable, yet unavailable_reason() is {reason!r}"

    def test_device_count_matches_availability(self, adapter: DeviceAdapter) -> None:
        count = adapter.device_count()
        assert type(count) is int, f"device_count() returned {count!r}, not an int"
        if adapter.is_available():
            assert count >= 1, f"available with device_count() == {count}"
        else:
            assert count == 0, f"unavailable with device_count() == {count}"

    def test_static_facts_are_non_empty_strings(self, adapter: DeviceAdapter) -> None:
        for method in (adapter.torch_device_type, adapter.ray_resource, adapter.rng_key):
            value = method()
            assert _non_empty_str(value), f"{method.__name__}() returned {value!r}"
        env = adapter.visible_devices_env()
        assert env is None or _non_empty_str(env), f"visible_devices_env() returned {env!r}"

    def test_distributed_backend_is_known(self, adapter: DeviceAdapter) -> None:
        backend = adapter.distributed_backend()
        registered = set(dist.Backend.backend_list) if dist.is_available() else set()
        assert isinstance(backend, str) and backend in KNOWN_BACKENDS | registered, (
            f"distributed_backend() returned {backend!r}; allowed: {sorted(KNOWN_BACKENDS | registered)}"
        )

    def test_backend_timeouts_follow_the_collective_timeout(self, adapter: DeviceAdapter) -> None:
        for requested in (0.5, 45.0, 3600.0):
            timeouts = adapter.backend_timeouts(requested)
            assert timeouts.backend == adapter.distributed_backend(), (
                f"backend_timeouts({requested}) is for {timeouts.backend!r}, the adapter's backend is "
                f"{adapter.distributed_backend()!r}"
            )
            assert timeouts.process_group_s >= requested, (
                f"backend_timeouts({requested}).process_group_s={timeouts.process_group_s}: shorter than asked"
            )
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in timeouts.environment.items())
            assert _non_empty_str(timeouts.rule), "backend_timeouts() must say how its values were derived"
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="timeout_s"):
                adapter.backend_timeouts(bad)

    def test_vendor_health_reports_without_raising(
        self, adapter: DeviceAdapter, device: torch.device
    ) -> None:
        from trainer.devices.vendor import VendorReport

        report = adapter.vendor_health(device, 10.0)
        assert isinstance(report, VendorReport), f"vendor_health() returned {report!r}"
        assert all(_non_empty_str(why) for why in report.skipped.values()), "a skipped tool needs a reason"
        assert report.ran or report.skipped, "vendor_health() must say which tools it read or why none"

    def test_distributed_backend_is_registered_when_available(self, adapter: DeviceAdapter) -> None:
        require_available(adapter)
        if not dist.is_available():
            pytest.skip("this torch build has no torch.distributed")
        backend = adapter.distributed_backend()
        assert backend in dist.Backend.backend_list, (
            f"{adapter.name} is available but torch.distributed has no backend {backend!r}; "
            f"registered: {dist.Backend.backend_list}"
        )

    def test_supported_dtypes_are_floating_and_include_float32(self, adapter: DeviceAdapter) -> None:
        dtypes = adapter.supported_dtypes()
        assert isinstance(dtypes, frozenset), f"supported_dtypes() returned {type(dtypes).__name__}"
        assert torch.float32 in dtypes, f"supported_dtypes() {sorted(map(str, dtypes))} lacks torch.float32"
        not_floating = [str(d) for d in dtypes if not (isinstance(d, torch.dtype) and d.is_floating_point)]
        assert not not_floating, f"supported_dtypes() has non-floating entries {not_floating}"

    def test_grad_scaler_disabled_is_a_pass_through(self, adapter: DeviceAdapter) -> None:
        scaler = adapter.grad_scaler(False)
        assert isinstance(scaler, torch.amp.GradScaler)
        assert scaler.is_enabled() is False
        loss = torch.ones(2)
        assert scaler.scale(loss) is loss

    def test_describe_is_json_and_names_the_family(self, adapter: DeviceAdapter) -> None:
        facts = adapter.describe()
        assert isinstance(facts, dict), f"describe() returned {type(facts).__name__}"
        try:
            json.dumps(facts)
        except (TypeError, ValueError) as exc:
            pytest.fail(f"describe() is not JSON-serialisable: {exc}; facts={facts!r}")
        assert facts.get("family") == adapter.name, f"describe()['family'] is {facts.get('family')!r}"

    def test_bind_when_unavailable_raises_device_unavailable_error(self, adapter: DeviceAdapter) -> None:
        if adapter.is_available():
            pytest.skip(f"{adapter.name} is available here")
        with pytest.raises(DeviceUnavailableError):
            adapter.bind(0)

    # Device behaviour: skipped where the family is unavailable.

    def test_bind_returns_a_device_of_its_type(self, adapter: DeviceAdapter) -> None:
        require_available(adapter)
        device = adapter.bind(0)
        assert isinstance(device, torch.device), f"bind(0) returned {device!r}"
        assert device.type == adapter.torch_device_type()

    def test_tensors_compute_on_the_device_and_synchronize(
        self, adapter: DeviceAdapter, device: torch.device
    ) -> None:
        x = torch.arange(8, dtype=torch.float32, device=device)
        y = x * 2 + 1
        adapter.synchronize(device)
        assert y.device.type == adapter.torch_device_type()
        assert torch.equal(y.cpu(), torch.arange(8, dtype=torch.float32) * 2 + 1)

    def test_memory_stats_are_byte_counts(self, adapter: DeviceAdapter, device: torch.device) -> None:
        stats = adapter.memory_stats(device)
        assert isinstance(stats, dict)
        assert set(stats) <= MEMORY_KEYS, (
            f"memory_stats() keys {sorted(stats)}; allowed {sorted(MEMORY_KEYS)}"
        )
        for key, value in stats.items():
            assert type(value) is int and value >= 0, f"memory_stats()[{key!r}] is {value!r}"
        if "allocated" in stats and "total" in stats:
            assert stats["allocated"] <= stats["total"]

    @pytest.mark.usefixtures("keep_host_rng")
    def test_rng_state_is_cpu_uint8(self, adapter: DeviceAdapter, device: torch.device) -> None:
        state = adapter.get_rng_state(device)
        assert isinstance(state, dict) and state, f"get_rng_state() returned {state!r}"
        for key, value in state.items():
            assert isinstance(key, str)
            assert (
                isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype == torch.uint8
            ), f"get_rng_state()[{key!r}] must be a CPU uint8 tensor"

    @pytest.mark.usefixtures("keep_host_rng")
    def test_rng_state_round_trips(self, adapter: DeviceAdapter, device: torch.device) -> None:
        state = adapter.get_rng_state(device)
        first = _draw(device)
        second = _draw(device)
        assert not all(_same(first, second)), "consecutive draws are equal: the draws do not use the RNG"
        adapter.set_rng_state(state, device)
        replay = _draw(device)
        assert _same(first, replay) == [True, True], (
            f"after set_rng_state, (host, device) draws equal the saved ones: {_same(first, replay)}"
        )

    @pytest.mark.usefixtures("keep_host_rng")
    def test_seed_is_deterministic(self, adapter: DeviceAdapter, device: torch.device) -> None:
        adapter.seed(1234, device)
        first = _draw(device)
        adapter.seed(1234, device)
        again = _draw(device)
        adapter.seed(4321, device)
        other = _draw(device)
        assert _same(first, again) == [True, True], f"same seed, (host, device) equal: {_same(first, again)}"
        assert _same(first, other) == [False, False], (
            f"other seed, (host, device) equal: {_same(first, other)}"
        )

    @pytest.mark.parametrize("dtype", [None, torch.float32], ids=["none", "float32"])
    def test_full_precision_autocast_is_a_no_op(
        self, adapter: DeviceAdapter, device: torch.device, dtype: torch.dtype | None
    ) -> None:
        context = adapter.autocast(dtype)
        assert isinstance(context, contextlib.AbstractContextManager)
        a = torch.randn(4, 4, device=device)
        with context:
            assert not torch.is_autocast_enabled(device.type), f"autocast({dtype}) enabled autocast"
            out = a @ a
        assert out.dtype == torch.float32

    @pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=["float16", "bfloat16"])
    def test_low_precision_autocast_computes_in_that_dtype(
        self, adapter: DeviceAdapter, device: torch.device, dtype: torch.dtype
    ) -> None:
        if dtype not in adapter.supported_dtypes():
            pytest.skip(f"{adapter.name} does not support {dtype}")
        if not torch_can_autocast(device.type, dtype):
            pytest.skip(f"torch cannot autocast {device.type} to {dtype}")
        a = torch.randn(4, 4, device=device)
        with adapter.autocast(dtype):
            out = a @ a
        assert out.dtype == dtype, f"matmul under autocast({dtype}) gave {out.dtype}"
        assert not torch.is_autocast_enabled(device.type), "autocast stayed enabled after the context exited"
        assert (a @ a).dtype == torch.float32
