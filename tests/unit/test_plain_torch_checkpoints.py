"""Checkpoints outside the toolkit: plain torch reads them, the export command makes a ``torch.save`` file,
and checkpoints written in the old flat key layout still restore.

Every test writes real checkpoints of a small GPT with AdamW state through the real CheckpointManager (or,
for the old layout, through DCP with the key names older versions wrote) and compares what comes back with
the tensors that were saved, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from trainer.checkpoint import CheckpointManager, Manifest, TrainingProgress
from trainer.checkpoint import rng as rng_io
from trainer.checkpoint import state as portable
from trainer.checkpoint.manifest import MANIFEST_NAME, checksum_files
from trainer.devices import get_adapter
from trainer.errors import ExitCode
from trainer.export import main as export_main
from trainer.model import GPT

ADAPTER = get_adapter("cpu")
DEVICE = ADAPTER.bind(0)
MODEL = {"vocab_size": 32, "seq_len": 8, "n_layer": 1, "n_head": 2, "n_embd": 16}
REPO = Path(__file__).resolve().parents[2]


class Trainee:
    """A small GPT and its AdamW after one real step (so the optimizer has state), plus an EMA tensor
    standing in for a task's extra state."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = GPT(**MODEL)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.ema = torch.randn(4, 3)
        self.step(seed)

    def step(self, seed: int) -> None:
        tokens = torch.randint(0, MODEL["vocab_size"], (2, MODEL["seq_len"] + 1), generator=_gen(seed))
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, MODEL["vocab_size"]), tokens[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict[tuple[str, str], torch.Tensor]:
        return {
            (fqn, name): value.detach().clone()
            for fqn, param in self.model.named_parameters()
            for name, value in self.optimizer.state[param].items()
        }


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        assert actual[key].dtype == want.dtype and torch.equal(actual[key], want), key


def _save(root: Path, trainee: Trainee, step: int) -> Path:
    progress = TrainingProgress(step=step, samples_seen=2 * step, world_size=1, seed=0)
    state = portable.capture(trainee.model, trainee.optimizer, trainee.scaler, extra={"ema": trainee.ema})
    return CheckpointManager(root).save(state, ADAPTER.get_rng_state(DEVICE), ADAPTER, progress, config={})


def _write_flat_layout(root: Path, trainee: Trainee, step: int, format_version: int) -> Path:
    """A committed checkpoint as manifest formats 1 and 2 wrote it: DCP keys ``model/<fqn>``,
    ``optim/<fqn>/<name>``, ``extra/<name>`` (spelled out here, independently of the code that reads them)."""
    flat = {f"model/{k}": v for k, v in trainee.model_state().items()}
    flat |= {f"optim/{fqn}/{name}": v for (fqn, name), v in trainee.optimizer_state().items()}
    flat["extra/ema"] = trainee.ema.clone()
    path = root / f"step_{step:09d}"
    path.mkdir(parents=True)
    dcp.save(flat, storage_writer=FileSystemWriter(path), no_dist=True)
    rng_io.write_rng(path, 0, ADAPTER.rng_key(), ADAPTER.get_rng_state(DEVICE))
    state = portable.capture(trainee.model, trainee.optimizer, trainee.scaler, extra={"ema": trainee.ema})
    manifest = Manifest(
        step=step,
        samples_seen=2 * step,
        world_size=1,
        family=ADAPTER.name,
        rng_key=ADAPTER.rng_key(),
        torch_version=torch.__version__,
        adapter=ADAPTER.describe(),
        tensors={
            k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for k, t in flat.items()
        },
        optimizer=state.optimizer,
        scaler=state.scaler,
        config={},
        files=checksum_files(path),
        task_state=state.task_state,
        created_at=time.time(),
        format_version=format_version,
    )
    body = asdict(manifest)
    if format_version == 1:
        del body["task_state"]  # format 1 had none
    body["manifest_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (path / MANIFEST_NAME).write_text(json.dumps(body, indent=2, sort_keys=True))
    return path


def _flip_byte(path: Path) -> Path:
    target = path / "__0_0.distcp"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


# --- plain torch reads the checkpoint ----------------------------------------------------------------------
def test_plain_dcp_load_reads_model_and_optimizer_from_a_checkpoint_directory(tmp_path: Path) -> None:
    saved = Trainee(seed=0)
    path = _save(tmp_path / "checkpoints", saved, step=5)
    fresh = Trainee(seed=1)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(fresh.model_state().values(), saved.model_state().values(), strict=True)
    )

    model_sd = fresh.model.state_dict()
    dcp.load({"model": model_sd}, checkpoint_id=path)
    fresh.model.load_state_dict(model_sd, strict=True)
    _assert_same(fresh.model_state(), saved.model_state())

    # The optimizer half is the ``state`` of DCP's own optimizer state dict, under "optimizer".
    osd = get_optimizer_state_dict(fresh.model, fresh.optimizer)
    dcp.load({"optimizer": {"state": osd["state"]}}, checkpoint_id=path)
    loaded = {(fqn, name): v for fqn, per in osd["state"].items() for name, v in per.items()}
    _assert_same(loaded, saved.optimizer_state())

    # The manifest lists exactly the keys DCP wrote, so either one describes the files.
    keys = set(FileSystemReader(path).read_metadata().state_dict_metadata)
    assert set(Manifest.read(path).tensors) == keys
    assert {"model.tok_emb.weight", "optimizer.state.tok_emb.weight.exp_avg", "extra.ema"} <= keys


@pytest.mark.parametrize("format_version", [1, 2])
def test_a_checkpoint_in_the_old_flat_layout_still_restores(tmp_path: Path, format_version: int) -> None:
    saved = Trainee(seed=0)
    path = _write_flat_layout(tmp_path, saved, step=4, format_version=format_version)
    assert "model/tok_emb.weight" in FileSystemReader(path).read_metadata().state_dict_metadata

    fresh = Trainee(seed=1)
    restored = CheckpointManager(tmp_path).restore(
        fresh.model, fresh.optimizer, fresh.scaler, ADAPTER, DEVICE, extra={"ema": torch.zeros(4, 3)}
    )

    assert restored is not None and restored.path == path and restored.manifest.step == 4
    _assert_same(fresh.model_state(), saved.model_state())
    _assert_same(fresh.optimizer_state(), saved.optimizer_state())
    assert torch.equal(restored.extra["ema"], saved.ema)


# --- the export command ------------------------------------------------------------------------------------
def test_export_of_a_run_directory_loads_into_a_fresh_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run directory's newest checkpoint that verifies is exported; a damaged newer one is passed over,
    with a warning naming it."""
    trainee = Trainee(seed=0)
    older = trainee.model_state()
    _save(tmp_path / "run" / "checkpoints", trainee, step=3)
    trainee.step(seed=3)
    newer = _save(tmp_path / "run" / "checkpoints", trainee, step=6)
    _flip_byte(newer)
    out = tmp_path / "model.pt"

    assert export_main([str(tmp_path / "run"), str(out)]) == ExitCode.FINISHED

    captured = capsys.readouterr()
    assert "step_000000006" in captured.err and "step 3" in captured.out
    fresh = Trainee(seed=1)
    fresh.model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    _assert_same(fresh.model_state(), older)


def test_export_with_optimizer_continues_training_bit_for_bit(tmp_path: Path) -> None:
    trainee = Trainee(seed=0)
    path = _save(tmp_path / "checkpoints", trainee, step=5)
    out = tmp_path / "full.pt"

    assert export_main([str(path), str(out), "--optimizer"]) == ExitCode.FINISHED

    exported = torch.load(out, weights_only=True)
    assert set(exported) == {"model", "optimizer"}
    fresh = Trainee(seed=1)
    fresh.model.load_state_dict(exported["model"], strict=True)
    fresh.optimizer.load_state_dict(exported["optimizer"])
    # The next step from the exported state is the step the original takes.
    trainee.step(seed=9)
    fresh.step(seed=9)
    _assert_same(fresh.model_state(), trainee.model_state())
    _assert_same(fresh.optimizer_state(), trainee.optimizer_state())


def test_export_never_overwrites_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(tmp_path / "checkpoints", Trainee(seed=0), step=5)
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")

    assert export_main([str(path), str(out)]) == ExitCode.CONFIG_ERROR

    assert str(out) in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_export_refuses_a_damaged_checkpoint_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _save(tmp_path / "checkpoints", Trainee(seed=0), step=5)
    damaged = _flip_byte(path)
    out = tmp_path / "model.pt"

    assert export_main([str(path), str(out)]) == ExitCode.FAILED

    assert str(damaged) in capsys.readouterr().err
    assert not out.exists()


def test_export_refuses_a_directory_without_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run").mkdir()
    out = tmp_path / "model.pt"

    assert export_main([str(tmp_path / "run"), str(out)]) == ExitCode.CONFIG_ERROR

    assert f"{tmp_path / 'run'}: not a checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_export_runs_as_a_module(tmp_path: Path) -> None:
    """The documented command line, in its own process."""
    _save(tmp_path / "run" / "checkpoints", Trainee(seed=0), step=5)
    out = tmp_path / "model.pt"

    done = subprocess.run(
        [sys.executable, "-m", "trainer.export", str(tmp_path / "run"), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert set(torch.load(out, weights_only=True)) == set(GPT(**MODEL).state_dict())
