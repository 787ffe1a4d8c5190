"""How the run is operated: cluster, monitoring, fault tolerance, probes and injected faults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainer.config.checks import require as _require
from trainer.errors import ConfigError


@dataclass
class PrometheusConfig:
    """The Prometheus exporter (``monitoring.exporter.PrometheusSink``), served by the driver."""

    _target_: str = "monitoring.exporter.PrometheusSink"
    host: str = "127.0.0.1"
    #: Port of ``/metrics``; 0 picks any free port (printed at start).
    port: int = 9400
    #: When ``port`` is in use, try the next N ports instead of failing.
    port_search: int = 0

    def __post_init__(self) -> None:
        _require("monitoring.port", self.port, 0 <= self.port <= 65535, "0..65535 (0: any free port)")
        _require("monitoring.port_search", self.port_search, self.port_search >= 0, "an integer >= 0")
        _require("monitoring.host", self.host, bool(self.host), "an address to bind, e.g. 127.0.0.1")


CLUSTER_MODES = ("process", "ray")


def _concrete_families() -> list[str]:
    """The device families a run can be placed on by name (every registered one but ``auto``)."""
    from trainer.devices import family_names

    return [f for f in family_names() if f != "auto"]


@dataclass
class ClusterConfig:
    #: ``process``: one worker in the driver process; ``ray``: a worker group of Ray actors.
    mode: str = "process"
    #: Ray address: null starts a local Ray; ``auto`` or ``ray://host:port`` joins an existing cluster.
    address: str | None = None
    workers: int = 1
    #: Elastic floor: when a lost worker cannot be replaced (no spare, and the family's capacity is gone with
    #: a node), the run goes on with the workers the family can still hold, down to this many, and grows back
    #: to ``workers`` once capacity returns. None: ``workers`` (no shrinking: the policy decides instead).
    min_workers: int | None = None
    #: World sizes on families other than the one the run starts on, where they differ from ``workers``: a
    #: fallback family with fewer (or more) devices, e.g. {sim_cuda: 2}. A run handed over to such a family
    #: goes on there at that size (the global batch is split over it; sharded state is resharded).
    family_workers: dict[str, int] = field(default_factory=dict)
    #: Warm spare actors (torch imported, model built) kept ready to replace a lost worker.
    spares: int = 1
    #: CPUs each worker actor reserves (fractional, so that spares and probes fit on small hosts).
    cpus_per_worker: float = 0.5
    #: Custom resources a local Ray advertises, e.g. simulated families: {sim_npu: 4, sim_cuda: 4}.
    local_resources: dict[str, float] = field(default_factory=lambda: {"sim_npu": 4.0, "sim_cuda": 4.0})
    #: CPUs a local Ray advertises (0: this host's count).
    local_num_cpus: int = 0
    #: The nice value of a local Ray's worker processes (0-19). Ray's own default, 15, lets every other
    #: process of the host (Ray's daemons, the driver) take a core from a rank in the middle of its step;
    #: training is the job, so the toolkit starts its ranks at 0, as torchrun's would be. A cluster the run
    #: joins (``address``) keeps its own setting (``RAY_worker_niceness`` where it is started).
    local_worker_niceness: int = 0
    #: Steps per command sent to the workers; each reply is a heartbeat.
    chunk_steps: int = 5
    #: Seconds a chunk should last (0: ``chunk_steps`` steps each). Set, a chunk holds as many steps as fit
    #: in it at the median step time measured so far (never fewer than ``chunk_steps``; before the first
    #: heartbeat, ``chunk_steps``): each chunk costs the driver and Ray a few milliseconds of CPU (~3-5 ms on
    #: two cores), which short steps pay in every chunk, while heartbeats, straggler checks and metrics
    #: come once a chunk.
    chunk_s: float = 0.0
    #: Recoveries allowed in one run before it is aborted.
    max_restarts: int = 3
    #: A chunk is late after max(deadline_factor x expected chunk time, deadline_floor_s).
    deadline_factor: float = 3.0
    deadline_floor_s: float = 30.0
    #: Once a rank is lost, hung or fails a collective, the others have max(release_factor x median step
    #: time, release_floor_s) to leave their collective with an error (keeping their process and state);
    #: the ones still blocked after that are killed and replaced.
    release_factor: float = 3.0
    release_floor_s: float = 5.0
    #: Seconds to wait for Ray to grant the worker group's resources before failing.
    start_timeout_s: float = 120.0
    #: Seconds to wait for an existing cluster (cluster.address) to answer before failing.
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _require("cluster.mode", self.mode, self.mode in CLUSTER_MODES, ", ".join(CLUSTER_MODES))
        _require("cluster.workers", self.workers, self.workers >= 1, "an integer >= 1")
        _require("cluster.spares", self.spares, self.spares >= 0, "an integer >= 0")
        names = _concrete_families()
        for family, size in self.family_workers.items():
            _require("cluster.family_workers", family, family in names, f"families among {', '.join(names)}")
            _require(f"cluster.family_workers.{family}", size, size >= 1, "an integer >= 1")
        if self.min_workers is not None:
            _require(
                "cluster.min_workers",
                self.min_workers,
                1 <= self.min_workers <= self.workers,
                f"null or an integer in 1..cluster.workers={self.workers}",
            )
        _require("cluster.cpus_per_worker", self.cpus_per_worker, self.cpus_per_worker > 0, "a float > 0")
        _require("cluster.chunk_steps", self.chunk_steps, self.chunk_steps >= 1, "an integer >= 1")
        _require(
            "cluster.chunk_s", self.chunk_s, self.chunk_s >= 0, "a float >= 0 (0: chunk_steps steps each)"
        )
        _require("cluster.max_restarts", self.max_restarts, self.max_restarts >= 0, "an integer >= 0")
        _require("cluster.deadline_factor", self.deadline_factor, self.deadline_factor >= 1, "a float >= 1")
        _require("cluster.deadline_floor_s", self.deadline_floor_s, self.deadline_floor_s > 0, "a float > 0")
        _require("cluster.release_factor", self.release_factor, self.release_factor >= 1, "a float >= 1")
        _require("cluster.release_floor_s", self.release_floor_s, self.release_floor_s > 0, "a float > 0")
        _require("cluster.start_timeout_s", self.start_timeout_s, self.start_timeout_s > 0, "a float > 0")
        _require("cluster.local_num_cpus", self.local_num_cpus, self.local_num_cpus >= 0, "an integer >= 0")
        _require(
            "cluster.local_worker_niceness",
            self.local_worker_niceness,
            0 <= self.local_worker_niceness <= 19,
            "an integer in 0..19 (lower values need privileges Ray's processes do not have)",
        )

    @property
    def least_workers(self) -> int:
        """The fewest workers the run may go on with (``min_workers``, else ``workers``)."""
        return self.workers if self.min_workers is None else self.min_workers

    def workers_on(self, family: str) -> int:
        """The world size a group on ``family`` is started with (``family_workers``, else ``workers``)."""
        return self.family_workers.get(family, self.workers)

    def least_workers_on(self, family: str) -> int:
        """The fewest workers the run may go on with on ``family`` (no more than its world size)."""
        return min(self.least_workers, self.workers_on(family))


#: Worker calls an injected fault can die in (``faults.families.<family>.die_in_call``).
DIE_IN_CALLS = ("restore", "save", "flush", "snapshot", "load_snapshot", "evaluate", "probe")


@dataclass
class FamilyFaults:
    """How one device family misbehaves (simulated families only make sense here)."""

    #: Seconds added to every collective (a slow fabric).
    collective_delay_s: float = 0.0
    #: Probability that a collective fails (a flaky link); applied to training and probes.
    collective_error_rate: float = 0.0
    #: A rank whose links are slow by ``slow_rank_delay_s`` per collective (named by the pairwise probe).
    slow_rank: int | None = None
    slow_rank_delay_s: float = 0.0
    #: Extra compute seconds per step on this rank (a straggler).
    straggler_rank: int | None = None
    straggler_delay_s: float = 0.0
    #: This rank's device computes wrong (caught by the device probe).
    wrong_compute_rank: int | None = None
    #: The family cannot be used at all (its workers fail to start).
    unavailable: bool = False
    #: Interconnect faults (delay, errors, slow rank) start at this step: a link that degrades mid-run.
    degrade_from_step: int = 0
    #: SIGKILL a worker when the controller calls this method on it (one of ``DIE_IN_CALLS``): the worker
    #: started in slot ``die_in_call_slot`` of the first group on this family (slots ``0..workers-1``
    #: hold ranks ``0..workers-1``, the next ones the warm spares, then the actors started later to refill
    #: the bundles of lost workers, in order). A loss during each kind of remote call.
    die_in_call: str | None = None
    die_in_call_slot: int = 0

    def check(self, family: str) -> None:
        key = f"faults.families.{family}"
        _require(
            f"{key}.collective_delay_s", self.collective_delay_s, self.collective_delay_s >= 0, "a float >= 0"
        )
        _require(
            f"{key}.collective_error_rate",
            self.collective_error_rate,
            0.0 <= self.collective_error_rate <= 1.0,
            "a probability in [0, 1]",
        )
        _require(
            f"{key}.slow_rank_delay_s", self.slow_rank_delay_s, self.slow_rank_delay_s >= 0, "a float >= 0"
        )
        _require(
            f"{key}.straggler_delay_s", self.straggler_delay_s, self.straggler_delay_s >= 0, "a float >= 0"
        )
        _require(
            f"{key}.die_in_call",
            self.die_in_call,
            self.die_in_call is None or self.die_in_call in DIE_IN_CALLS,
            f"null or one of {', '.join(DIE_IN_CALLS)}",
        )
        _require(
            f"{key}.die_in_call_slot", self.die_in_call_slot, self.die_in_call_slot >= 0, "an integer >= 0"
        )


@dataclass
class FaultsConfig:
    """Injected faults, off by default. Used by tests and demos; each acts on the real mechanism."""

    #: SIGKILL the worker of this rank when it is about to run ``kill_at_step`` (first incarnation only).
    kill_rank: int | None = None
    #: More ranks killed at the same step (with ``kill_rank``, if set): several ranks lost at once.
    kill_ranks: list[int] = field(default_factory=list)
    kill_at_step: int | None = None
    #: The signal the killed ranks get: ``SIGKILL`` (the process vanishes) or ``SIGTERM`` (it is asked to
    #: leave, as a node drain or an eviction does: a planned removal, see trainer.cluster.leaving).
    kill_signal: str = "SIGKILL"
    #: This rank stops making progress (sleeps) when it is about to run ``hang_at_step`` (first incarnation).
    hang_rank: int | None = None
    hang_at_step: int | None = None
    #: Where the hung rank stops: ``compute`` (before the step: data loading, forward) or ``collective``
    #: (inside the step's gradient all-reduce, so every peer waits in the collective too).
    hang_phase: str = "compute"
    #: Damage the newest committed checkpoint (flip a byte) before the run starts.
    corrupt_latest_checkpoint: bool = False
    #: SIGKILL the checkpoint-writing worker (rank 0) while it writes the checkpoint of this step, after
    #: the files are written aside and before the commit (worker group runs, first incarnation only).
    kill_during_checkpoint_step: int | None = None
    #: Per-family misbehaviour, keyed by family name.
    families: dict[str, FamilyFaults] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        killing = self.kill_rank is not None or bool(self.kill_ranks)
        if killing != (self.kill_at_step is not None):
            raise ConfigError(
                f"faults.kill_rank={self.kill_rank!r}, faults.kill_ranks={list(self.kill_ranks)} and "
                f"faults.kill_at_step={self.kill_at_step!r}: allowed: kill_at_step set when kill_rank or "
                "kill_ranks names a rank, null otherwise"
            )
        if self.kill_rank is not None:
            _require("faults.kill_rank", self.kill_rank, self.kill_rank >= 0, "an integer >= 0")
        for i, rank in enumerate(self.kill_ranks):
            _require(f"faults.kill_ranks[{i}]", rank, rank >= 0, "an integer >= 0")
        if self.kill_at_step is not None:
            _require("faults.kill_at_step", self.kill_at_step, self.kill_at_step >= 1, "an integer >= 1")
        _require(
            "faults.kill_signal",
            self.kill_signal,
            self.kill_signal in ("SIGKILL", "SIGTERM"),
            "SIGKILL, SIGTERM",
        )
        if (self.hang_rank is None) != (self.hang_at_step is None):
            raise ConfigError(
                f"faults.hang_rank={self.hang_rank!r} and faults.hang_at_step={self.hang_at_step!r}: "
                "allowed: both set or both null"
            )
        if self.hang_rank is not None and self.hang_at_step is not None:
            _require("faults.hang_rank", self.hang_rank, self.hang_rank >= 0, "an integer >= 0")
            _require("faults.hang_at_step", self.hang_at_step, self.hang_at_step >= 1, "an integer >= 1")
        for family, faults in self.families.items():
            faults.check(family)
        _require(
            "faults.hang_phase",
            self.hang_phase,
            self.hang_phase in ("compute", "collective"),
            "compute, collective",
        )

    def killed_ranks(self) -> frozenset[int]:
        """Every rank killed at ``kill_at_step``: ``kill_rank`` and ``kill_ranks``."""
        return frozenset([*self.kill_ranks, *([] if self.kill_rank is None else [self.kill_rank])])

    def for_family(self, family: str) -> FamilyFaults:
        return self.families.get(family, FamilyFaults())


@dataclass
class FaultToleranceConfig:
    """When to retry, replace, exclude, fall back to another family, or give up."""

    #: Families to move to, in order, when the current one is given up (the run starts on device.family).
    fallback_chain: list[str] = field(default_factory=list)
    #: Failures on one family within ``window_s`` that make the policy give the family up.
    max_failures_per_family: int = 3
    #: Degraded interconnect probes on one family within ``window_s`` that make the policy give it up.
    max_degraded_probes: int = 2
    window_s: float = 600.0
    #: Whether a family given up may be chosen again later in the same run.
    retry_given_up_families: bool = False
    #: A rank is hung after no progress for max(hang_factor x median step time, hang_floor_s).
    hang_factor: float = 3.0
    hang_floor_s: float = 10.0
    #: With ``train.compile``, a rank inside one compilation (dynamo tracing, inductor's code generation) is
    #: hung only after this long, and a chunk's deadline restarts once a rank compiles; the collective
    #: timeout is at least this long too (its peers wait in the step's all-reduce meanwhile).
    compile_timeout_s: float = 600.0
    #: A rank whose compute time exceeds straggler_factor x the median, and the median by at least
    #: ``straggler_floor_s`` per step, is a straggler; after ``straggler_strikes`` flagged chunks it is
    #: excluded (replaced). The floor keeps a shared host's scheduling jitter on steps of a few milliseconds
    #: (a rank 1 ms behind its peers is 1.5x of a 2 ms step) from replacing healthy ranks.
    straggler_factor: float = 1.4
    straggler_floor_s: float = 0.01
    straggler_strikes: int = 3
    #: Relative tolerance of the parity check (held-out loss before vs after a hand-over), per precision.
    parity_rtol: dict[str, float] = field(default_factory=lambda: {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2})
    #: Sharded state (``train.parallelism=fsdp``): every rank hands the driver a host copy of its own shards at
    #: the first chunk end at least this many steps after the previous copy, so that a lost rank's group
    #: goes on from that step without reading the newest checkpoint (trainer.cluster.shard_copies). Costs
    #: one copy of each rank's shards in Ray's object store. 0: no copies (a lost rank's group restores
    #: from the newest checkpoint). Ignored with ``ddp`` (a live peer's snapshot restores any rank).
    shard_copy_interval_steps: int = 1

    def __post_init__(self) -> None:
        allowed = _concrete_families()
        for i, family in enumerate(self.fallback_chain):
            _require(f"fault_tolerance.fallback_chain[{i}]", family, family in allowed, ", ".join(allowed))
        for key in ("max_failures_per_family", "max_degraded_probes", "straggler_strikes"):
            value = getattr(self, key)
            _require(f"fault_tolerance.{key}", value, value >= 1, "an integer >= 1")
        _require("fault_tolerance.window_s", self.window_s, self.window_s > 0, "a float > 0")
        _require(
            "fault_tolerance.shard_copy_interval_steps",
            self.shard_copy_interval_steps,
            self.shard_copy_interval_steps >= 0,
            "an integer >= 0 (0: no shard copies)",
        )
        _require("fault_tolerance.hang_factor", self.hang_factor, self.hang_factor >= 1, "a float >= 1")
        _require("fault_tolerance.hang_floor_s", self.hang_floor_s, self.hang_floor_s > 0, "a float > 0")
        _require(
            "fault_tolerance.compile_timeout_s",
            self.compile_timeout_s,
            self.compile_timeout_s > 0,
            "a float > 0",
        )
        _require(
            "fault_tolerance.straggler_floor_s",
            self.straggler_floor_s,
            self.straggler_floor_s >= 0,
            "a float >= 0 (seconds per step; 0: the factor alone decides)",
        )
        _require(
            "fault_tolerance.straggler_factor",
            self.straggler_factor,
            self.straggler_factor > 1,
            "a float > 1",
        )


@dataclass
class ProbesConfig:
    """Interconnect and device probes: before training on a family, and every ``interval_steps``."""

    preflight: bool = True
    #: In-flight interconnect probe every N steps (0: never).
    interval_steps: int = 0
    sizes_bytes: list[int] = field(default_factory=lambda: [4096, 1 << 20, 4 << 20])
    iters: int = 3
    timeout_s: float = 30.0
    #: Degraded = bus bandwidth below this fraction of the baseline.
    degraded_fraction: float = 0.8
    #: Expected bus bandwidth per family (bytes/s); missing → the first healthy measurement.
    baseline_busbw: dict[str, float] = field(default_factory=dict)
    #: In-flight probes are light (these sizes, no pairwise test) to stay near 1% of training time; a
    #: degraded light probe is followed by the full sweep with the pairwise test to name the link.
    inflight_sizes_bytes: list[int] = field(default_factory=lambda: [1 << 20])
    #: In-flight probing may cost at most this fraction of training time: a due probe that would exceed
    #: it is skipped (and journalled as skipped).
    max_cost_fraction: float = 0.01
    #: A directory searched for the vendors' health tools (nvidia-smi, npu-smi, hccn_tool) before PATH; for
    #: simulated families the only place they are read from (stand-ins). None: PATH only, none for them.
    vendor_tools_dir: str | None = None

    def __post_init__(self) -> None:
        _require("probes.interval_steps", self.interval_steps, self.interval_steps >= 0, "an integer >= 0")
        _require(
            "probes.max_cost_fraction",
            self.max_cost_fraction,
            0 < self.max_cost_fraction <= 1,
            "a float in (0, 1]",
        )
        _require("probes.iters", self.iters, self.iters >= 1, "an integer >= 1")
        _require("probes.timeout_s", self.timeout_s, self.timeout_s > 0, "a float > 0")
        _require(
            "probes.degraded_fraction",
            self.degraded_fraction,
            0 < self.degraded_fraction <= 1,
            "a float in (0, 1]",
        )
        _require("probes.sizes_bytes", self.sizes_bytes, bool(self.sizes_bytes), "a non-empty list of sizes")
        _require(
            "probes.vendor_tools_dir",
            self.vendor_tools_dir,
            self.vendor_tools_dir is None or os.path.isdir(self.vendor_tools_dir),
            "null or an existing directory",
        )
