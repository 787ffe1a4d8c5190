"""What is trained and how: device, model, data, optimizer, checkpoints, the training loop."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import II

from trainer.config.checks import require as _require

PRECISIONS = ("fp32", "bf16", "fp16")
RESUME_MODES = ("latest", "none")
#: Values of ``checkpoint.writer_priority``.
WRITER_PRIORITIES = ("normal", "idle")


@dataclass
class DeviceConfig:
    family: str = "auto"
    precision: str = "fp32"
    #: torch intra-op threads per worker; 0 = this host's cores divided by the workers on it.
    num_threads: int = 0

    def __post_init__(self) -> None:
        from trainer.devices import family_names

        _require("device.family", self.family, self.family in family_names(), ", ".join(family_names()))
        _require("device.precision", self.precision, self.precision in PRECISIONS, ", ".join(PRECISIONS))
        _require("device.num_threads", self.num_threads, self.num_threads >= 0, "an integer >= 0")


@dataclass
class GPTConfig:
    _target_: str = "trainer.model.GPT"
    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("vocab_size", "seq_len", "n_layer", "n_head", "n_embd"):
            value = getattr(self, key)
            _require(f"model.{key}", value, value >= 1, "an integer >= 1")
        _require(
            "model.n_embd",
            self.n_embd,
            self.n_embd % self.n_head == 0,
            f"a multiple of model.n_head={self.n_head}",
        )
        _require("model.dropout", self.dropout, 0.0 <= self.dropout < 1.0, "a float in [0, 1)")


@dataclass
class SyntheticDataConfig:
    _target_: str = "trainer.data.SyntheticCorpus"
    seed: int = 0
    vocab_size: int = II("model.vocab_size")
    seq_len: int = II("model.seq_len")
    noise: float = 0.1

    def __post_init__(self) -> None:
        _require("data.noise", self.noise, 0.0 <= self.noise <= 1.0, "a float in [0, 1]")
        _require("data.vocab_size", self.vocab_size, self.vocab_size >= 2, "an integer >= 2")


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    foreach: bool | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        _require("optim.lr", self.lr, self.lr > 0, "a float > 0")
        _require("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, "a float >= 0")
        _require(
            "optim.betas",
            self.betas,
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "two floats in [0, 1)",
        )


@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    foreach: bool | None = None

    def __post_init__(self) -> None:
        _require("optim.lr", self.lr, self.lr > 0, "a float > 0")
        _require("optim.momentum", self.momentum, 0.0 <= self.momentum < 1.0, "a float in [0, 1)")


@dataclass
class CheckpointConfig:
    #: Directory of committed checkpoints; relative paths are inside the run directory.
    dir: str = "checkpoints"
    #: Save every N steps (0: only at the end of the run).
    interval_steps: int = 50
    #: Committed checkpoints kept; older ones are deleted after a newer one commits.
    keep_last: int = 3
    #: ``latest``: resume from the newest good checkpoint in ``dir`` if any; ``none``: start fresh
    #: (refused when ``dir`` already holds checkpoints, so nothing is overwritten).
    resume: str = "latest"
    #: Block training only for the copy to CPU memory; write and commit in the background.
    async_save: bool = True
    #: After SIGTERM/SIGINT to the driver: seconds to stop at the step in flight and commit it (under
    #: Kubernetes' default 30 s before SIGKILL).
    preempt_grace_s: float = 20.0
    #: One driver per checkpoint directory (trainer.checkpoint.lease): a lease its holder has not renewed
    #: for this long is taken over by a new driver; a live one makes a second driver refuse to start.
    lease_stale_s: float = 30.0
    #: Options of the object store's filesystem when ``dir`` is a URL (``s3://bucket/prefix``), passed to
    #: s3fs: ``endpoint_url``, ``key``, ``secret``, ``token``, ``client_kwargs``… Credentials are redacted
    #: from every manifest; without them s3fs reads the usual AWS environment variables and profiles.
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: CPU priority of the background writer (``normal``, or ``idle``: Linux ``SCHED_IDLE``, only the CPU
    #: time training leaves over; a save then costs training less and takes longer to commit).
    writer_priority: str = "normal"
    #: Write the checkpoint files with O_DIRECT where the filesystem allows it (elsewhere, and with
    #: ``false``, through the page cache): a tensor's bytes go from the staging buffers to the disk
    #: uncopied, and the write takes about a third of the CPU of a buffered one (which a save takes from
    #: training where training keeps every core busy).
    direct_io: bool = True
    #: Sharded saves (every rank writes its shards, the driver commits): how long the driver waits for one in
    #: flight to commit before a recovery, a hand-over or the next save goes on without it. A save not
    #: committed by then (a rank still writing: a stalled filesystem) is abandoned, never committed later.
    commit_wait_s: float = 300.0

    def __post_init__(self) -> None:
        _require("checkpoint.dir", self.dir, bool(self.dir), "a non-empty path or s3://bucket/prefix")
        from trainer.checkpoint.locations import check_location  # here: config imports nothing at load time

        check_location(self.dir)
        _require(
            "checkpoint.interval_steps", self.interval_steps, self.interval_steps >= 0, "an integer >= 0"
        )
        _require("checkpoint.keep_last", self.keep_last, self.keep_last >= 1, "an integer >= 1")
        _require("checkpoint.resume", self.resume, self.resume in RESUME_MODES, ", ".join(RESUME_MODES))
        _require("checkpoint.preempt_grace_s", self.preempt_grace_s, self.preempt_grace_s > 0, "seconds > 0")
        _require("checkpoint.lease_stale_s", self.lease_stale_s, self.lease_stale_s >= 1, "seconds >= 1")
        _require("checkpoint.commit_wait_s", self.commit_wait_s, self.commit_wait_s > 0, "seconds > 0")
        priorities = WRITER_PRIORITIES if hasattr(os, "SCHED_IDLE") else ("normal",)
        _require(
            "checkpoint.writer_priority",
            self.writer_priority,
            self.writer_priority in priorities,
            ", ".join(priorities) + ("" if hasattr(os, "SCHED_IDLE") else " (idle needs Linux's SCHED_IDLE)"),
        )


#: Values of ``train.parallelism``.
PARALLELISMS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    #: Total optimizer steps of the run (a resumed run stops at the same step).
    steps: int = 200
    global_batch_size: int = 16
    seed: int = 1234
    #: Max gradient norm; 0 disables clipping.
    grad_clip: float = 1.0
    #: Micro-batches per optimizer step on each rank (gradient accumulation); the local batch splits evenly.
    grad_accum_steps: int = 1
    log_interval: int = 10
    #: Held-out samples used for the evaluation loss reported at checkpoints and the end of the run.
    eval_samples: int = 16
    #: A step whose gradients are not finite is skipped on every rank; this many in a row stop the run as a
    #: user error (exit code 4).
    max_nonfinite_steps: int = 10
    #: A model state dict to start from (a ``torch.save`` file: pretrained weights, or a file written by
    #: ``python -m trainer.export``); used only when the run has no checkpoint of its own. null: none.
    init_weights: str | None = None
    #: How a group of ranks holds the model: ``ddp`` (each rank a replica, gradients all-reduced) or ``fsdp``
    #: (torch's ``fully_shard``: parameters, gradients and optimizer state sharded over the ranks, each unit
    #: of ``Task.fsdp_units`` gathered for its forward and backward).
    parallelism: str = "ddp"
    #: Collate the next step's batches on a background thread while the current step trains (pinned for an
    #: accelerator), so the device never waits for data. The dataset and collate function must then not draw
    #: from torch's global random generator (see :mod:`trainer.data.prefetch`); false: on the training thread.
    #: null (default): on for an accelerator, off where the device is the host's CPU (its step already uses
    #: every core given to the rank: a collate thread beside it only takes turns with it, and holds the
    #: interpreter the step needs between operators).
    prefetch: bool | None = None
    #: Compile the model's forward with ``torch.compile`` (in place, ``nn.Module.compile``: the state dict's
    #: keys, hence checkpoints, peer snapshots and exports, stay the plain model's). Every process compiles on
    #: its first steps, a replacement or a hand-over's new family too; that step is slower.
    compile: bool = False

    def __post_init__(self) -> None:
        _require("train.steps", self.steps, self.steps >= 1, "an integer >= 1")
        _require(
            "train.parallelism", self.parallelism, self.parallelism in PARALLELISMS, ", ".join(PARALLELISMS)
        )
        _require(
            "train.global_batch_size", self.global_batch_size, self.global_batch_size >= 1, "an integer >= 1"
        )
        _require("train.grad_clip", self.grad_clip, self.grad_clip >= 0, "a float >= 0 (0 disables clipping)")
        _require(
            "train.grad_accum_steps", self.grad_accum_steps, self.grad_accum_steps >= 1, "an integer >= 1"
        )
        _require("train.log_interval", self.log_interval, self.log_interval >= 1, "an integer >= 1")
        _require("train.eval_samples", self.eval_samples, self.eval_samples >= 0, "an integer >= 0")
        _require(
            "train.max_nonfinite_steps",
            self.max_nonfinite_steps,
            self.max_nonfinite_steps >= 1,
            "an integer >= 1",
        )

    def prefetches(self, device_type: str) -> bool:
        """Whether the next step's batches are collated ahead for a device of this torch type (``"cpu"``,
        ``"cuda"``, ``"npu"``): ``prefetch`` resolved."""
        return device_type != "cpu" if self.prefetch is None else self.prefetch

    @property
    def sharded(self) -> bool:
        """Whether the group's state is sharded over its ranks (``parallelism=fsdp``): no rank holds it whole."""
        return self.parallelism == "fsdp"
