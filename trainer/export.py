"""Export a checkpoint's model (and optionally optimizer) state to one plain torch.save file.

``python -m trainer.export runs/my-run model.pt`` takes the run's newest checkpoint that verifies;
``python -m trainer.export runs/my-run/checkpoints/step_000000040 model.pt`` takes that one (and fails if it is
damaged); ``python -m trainer.export s3://bucket/run model.pt --storage-option endpoint_url=...`` reads a
``checkpoint.dir`` on object storage (credentials as for the run: options, else the AWS environment). The
file loads in any torch program: ``model.load_state_dict(torch.load("model.pt",
weights_only=True))``. With ``--optimizer`` it holds ``{"model": .., "optimizer": ..}`` instead. An existing
output file is never overwritten.

Exit codes (``trainer.errors.ExitCode``): 0 written; 2 a bad argument (not a checkpoint or run directory, the
output exists); 1 the checkpoint cannot be read (damaged: a checksum, a missing file, unreadable DCP data).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.checkpoint.export import export
from trainer.errors import CheckpointError, ExitCode, NoCheckpointError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "source",
        help="a run directory, its checkpoints/ directory (newest verified checkpoint), or one step_* checkpoint; "
        "or such a URL on object storage (s3://bucket/prefix)",
    )
    parser.add_argument("out", type=Path, help="the file to write (must not exist)")
    parser.add_argument(
        "--optimizer",
        action="store_true",
        help='also export the optimizer state; the file then holds {"model": .., "optimizer": ..}',
    )
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the object store's client (as checkpoint.storage_options), e.g. endpoint_url=...",
    )
    args = parser.parse_args(argv)
    options = dict(o.split("=", 1) for o in args.storage_option if "=" in o)
    bad = [o for o in args.storage_option if "=" not in o]
    if bad:
        print(f"error: --storage-option {bad[0]!r}: allowed: KEY=VALUE", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
    try:
        done = export(args.source, args.out, optimizer=args.optimizer, storage_options=options or None)
    except (FileExistsError, NoCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)  # a bad argument, like a bad setting
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.FAILED)
    for path, why in done.skipped:
        print(f"warning: skipped damaged checkpoint {path}: {why}", file=sys.stderr)
    print(f"wrote {done.out}: {done.tensors} tensors of {done.checkpoint} (step {done.step})")
    return int(ExitCode.FINISHED)


if __name__ == "__main__":
    sys.exit(main())
