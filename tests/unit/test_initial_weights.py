"""Initial weights (``train.init_weights``): a run that has no checkpoint starts from a state dict on disk —
here the file the export command wrote from another run (fine-tuning); one that resumes ignores them; a file
that does not fit the task's model is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.checkpoint.export import export
from trainer.errors import ConfigError, ExitCode
from trainer.job import run
from trainer.testing.configs import TINY_CPU, make_config
from trainer.testing.runs import events
from trainer.testing.state import mismatched, restored_state
from trainer.worker import Worker

TINY = (*TINY_CPU, "train.steps=3")


@pytest.fixture
def pretrained(tmp_path: Path) -> Path:
    """A 3-step run's model, exported with its optimizer (``--optimizer`` layout) to one torch.save file."""
    assert run(make_config(*TINY), run_dir=tmp_path / "pretrain") == ExitCode.FINISHED
    out = tmp_path / "pretrained.pt"
    export(tmp_path / "pretrain", out, optimizer=True)
    return out


def test_a_new_run_starts_from_the_initial_weights_and_a_resumed_one_from_its_checkpoint(
    tmp_path: Path, pretrained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = torch.load(pretrained, weights_only=True)["model"]
    fresh = Worker(make_config(*TINY))
    fresh.setup()
    assert any(not torch.equal(v, saved[k]) for k, v in fresh.module.state_dict().items())

    monkeypatch.chdir(tmp_path)  # a relative path, as typed where the job is launched
    config = make_config(*TINY, "train.init_weights=pretrained.pt")
    worker = Worker(config)
    worker.setup()
    live = worker.module.state_dict()
    assert sorted(live) == sorted(saved) and all(torch.equal(live[k], saved[k]) for k in saved)

    # A run resumes from its own checkpoint, not from the initial weights: stopped at step 3 and resumed to
    # step 4 (from another working directory: the resolved path travels with the run), it ends where a
    # straight 4-step run from the same initial weights ends.
    assert run(config, run_dir=tmp_path / "tuned") == ExitCode.FINISHED
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    four = make_config(*TINY, f"train.init_weights={pretrained}", "train.steps=4")
    assert run(four, run_dir=tmp_path / "tuned") == ExitCode.FINISHED
    assert run(four, run_dir=tmp_path / "straight") == ExitCode.FINISHED
    resumed = restored_state(four, tmp_path / "tuned" / "checkpoints")
    straight = restored_state(four, tmp_path / "straight" / "checkpoints")
    assert int(resumed["step"]) == 4 and mismatched(resumed, straight) == []
    assert [e["step"] for e in events(tmp_path / "tuned", "resumed")] == [3]


def test_initial_weights_that_do_not_fit_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ConfigError, match=r"train\.init_weights=.*wrong\.pt.* does not fit the task's model"):
        run(make_config(*TINY, f"train.init_weights={wrong}"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"train\.init_weights='missing\.pt': no such file"):
        run(make_config(*TINY, "train.init_weights=missing.pt"), run_dir=tmp_path / "run")
    not_tensors = tmp_path / "numbers.pt"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ConfigError, match=r"does not hold a state dict"):
        run(make_config(*TINY, f"train.init_weights={not_tensors}"), run_dir=tmp_path / "run")
