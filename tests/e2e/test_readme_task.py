"""The README's "Bring your own training code" example, run as written: its code block becomes a module
outside the repository and its command (shortened) trains it on one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from trainer.journal import Journal

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_task_example_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text.split("## Bring your own training code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    command = re.search(r"```bash\n(.*?)```", section, re.S)
    assert code and command and "my_pkg/regression.py" in code.group(1)
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "regression.py").write_text(code.group(1))
    overrides = [a for a in command.group(1).replace("\\\n", " ").split()[3:] if not a.startswith("cluster")]
    overrides = [
        *overrides,
        "device=cpu",
        "train.steps=6",
        "monitoring=off",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "trainer", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    [finished] = [
        e for e in Journal(tmp_path / "run" / "journal.jsonl").read() if e["event"] == "run_finished"
    ]
    assert finished["step"] == 6 and finished["eval_loss"] == finished["eval_loss"]  # evaluated: not NaN
