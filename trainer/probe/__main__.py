"""``python -m trainer.probe``: see :mod:`trainer.probe.cli`."""

import os
import sys

import torch.distributed as dist

from trainer.errors import ExitCode
from trainer.probe.cli import main

if __name__ == "__main__":
    code = main()
    if dist.is_initialized() and code != ExitCode.FINISHED:
        os._exit(int(code))  # a probe thread may be blocked in a collective; leave without waiting for it
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(int(code))
