"""``python -m trainer <overrides>``: compose the Hydra config and call :func:`trainer.job.run`."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from trainer.config import CONFIG_MODULE
from trainer.errors import ConfigError, ExitCode, TrainerError
from trainer.job import run


# The configs are package data, so the entry point works the same from a wheel and from the repository.
@hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        code = run(cfg)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        code = ExitCode.CONFIG_ERROR
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = ExitCode.FAILED
    sys.exit(int(code))


if __name__ == "__main__":
    main()
