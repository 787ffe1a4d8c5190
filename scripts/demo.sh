#!/usr/bin/env bash
# The main job: the hand-over story on a CPU. A local Ray advertises two simulated accelerator families;
# training starts on sim_npu (a stand-in for Ascend) whose interconnect turns flaky and slow mid-run;
# probes flag it, the policy gives the family up, and the run is handed over to sim_cuda, which finishes
# it after a parity check. Prints a summary; the run directory holds the journal and checkpoints.
# Extra arguments are Hydra overrides, e.g. scripts/demo.sh train.steps=600
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
RUN_DIR="${RUN_DIR:-$ROOT/runs/r2_handover/$(date +%Y%m%d-%H%M%S)}"
export RAY_DEDUP_LOGS=0 PYTHONWARNINGS=ignore

.venv/bin/python -m trainer experiment=r2_handover hydra.run.dir="$RUN_DIR" hydra.job_logging.root.level=WARNING "$@"
