"""``python -m trainer.report RUN_DIR [--png PATH] [--json]``: see :mod:`trainer.report.cli`."""

import sys

from trainer.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
