"""``python -m trainer <overrides>``: compose the Hydra config and call :func:`trainer.job.run`.

Multirun (``-m``) runs every job of the sweep, each in its own run directory, one after another; the process
then exits with the largest exit code of its jobs (0 only when every job finished).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from trainer.config import CONFIG_MODULE
from trainer.errors import ConfigError, ExitCode, TrainerError
from trainer.job import run

#: The exit code of each job this process ran (one, or one per job of a sweep).
_outcomes: list[ExitCode] = []


# The configs are package data, so the entry point works the same from a wheel and from the repository.
@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # No sys.exit here: in a sweep it would end the sweep after its first job.
    try:
        code = run(cfg)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        code = ExitCode.CONFIG_ERROR
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = ExitCode.FAILED
    _outcomes.append(code)


if __name__ == "__main__":
    main()
    sys.exit(int(max(_outcomes, default=ExitCode.CONFIG_ERROR)))
