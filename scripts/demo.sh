#!/usr/bin/env bash
# The main job, CPU-only: train the built-in GPT, checkpoint every 10 steps, stop half-way, then re-run the
# same command with the same run directory and watch it resume from the newest checkpoint and finish.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
RUN_DIR="${RUN_DIR:-$ROOT/runs/demo/$(date +%Y%m%d-%H%M%S)}"

echo "== part 1: train to step 60 of 120"
.venv/bin/python -m trainer experiment=demo hydra.run.dir="$RUN_DIR" train.steps=60 "$@"
echo
echo "== part 2: the same run directory, 120 steps: resumes from the newest checkpoint"
.venv/bin/python -m trainer experiment=demo hydra.run.dir="$RUN_DIR" train.steps=120 "$@"
echo
echo "checkpoints: $(ls "$RUN_DIR/checkpoints" | tr '\n' ' ')"
echo "journal:     $RUN_DIR/journal.jsonl"
