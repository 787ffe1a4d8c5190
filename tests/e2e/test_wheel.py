"""The built wheel is the whole product: installed into a fresh environment, it runs a job from a directory
outside the repository, with the Hydra configs it carries as the package ``trainer.conf``."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

from trainer.errors import ExitCode

ROOT = Path(__file__).resolve().parents[2]
#: What the build must not read or copy: the environment, caches, outputs, earlier builds.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "runs",
    "outputs",
    "multirun",
)
#: Sources that must reach the wheel, by directory in the repository and place in the wheel.
SHIPPED = {"trainer": "trainer", "monitoring": "monitoring", "conf": "trainer/conf"}
SHIPPED_SUFFIXES = {".py", ".yaml", ".yml", ".json"}


def _check(cmd: list[str | Path], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _expected_wheel_files(source: Path) -> set[str]:
    return {
        f"{prefix}/{path.relative_to(source / directory).as_posix()}"
        for directory, prefix in SHIPPED.items()
        for path in (source / directory).rglob("*")
        if path.is_file() and path.suffix in SHIPPED_SUFFIXES
    }


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """``pip wheel`` of a copy of the repository, so that egg-info and build/ stay out of the checkout."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    dist = tmp_path / "dist"
    _check(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source],
        cwd=tmp_path,
        env=env,
        timeout=180,
    )
    (wheel,) = dist.glob("fleet_trainer-*.whl")
    missing = _expected_wheel_files(source) - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, (
        f"not in the wheel: {sorted(missing)}; name the package in [tool.setuptools] packages, or its files in "
        "[tool.setuptools.package-data], in pyproject.toml"
    )
    return wheel


def _fresh_environment(tmp_path: Path, wheel: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A new virtual environment holding only ``wheel``; its dependencies are borrowed from this one through
    a plain path line in a .pth file, which adds the directory without running the .pth files in it, so the
    editable install's finder stays out. Returns its python and its site-packages."""
    fresh = tmp_path / "fresh"
    _check([sys.executable, "-m", "venv", "--without-pip", fresh], cwd=tmp_path, env=env, timeout=60)
    python = fresh / "bin" / "python"
    _check(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    purelib: list[str | Path] = [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    fresh_site = Path(_check(purelib, cwd=tmp_path, env=env, timeout=30).strip())
    (fresh_site / "_dependencies.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    return python, fresh_site


def test_wheel_runs_a_job_outside_the_repository(tmp_path: Path) -> None:
    # No PYTHONPATH may lead back to the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    python, fresh_site = _fresh_environment(tmp_path, _build_wheel(tmp_path, env), env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    origins = (
        "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m).origin "
        "for m in ('trainer', 'trainer.conf', 'monitoring.exporter')}))"
    )
    for module, origin in json.loads(
        _check([python, "-c", origins], cwd=elsewhere, env=env, timeout=30)
    ).items():
        assert Path(origin).is_relative_to(fresh_site), f"{module} imported from {origin}, not the wheel"

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            python,
            "-m",
            "trainer",
            "experiment=quick",
            "monitoring=off",
            "train.steps=2",
            "model.n_embd=32",
            "model.seq_len=16",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == ExitCode.FINISHED, result.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_000000002"
    assert (run_dir / "checkpoints" / latest / "manifest.json").is_file()
    events = [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("run_finished") == 1
