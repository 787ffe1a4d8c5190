#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent; a second run is instant).
# torch is installed first and pinned to the CPU wheel present on these machines, so that nothing pulls a
# multi-GB CUDA build; then the project itself with its test extras.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.setup-stamp"

want="$(cat "$ROOT/pyproject.toml" "$0" | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: Python >= 3.11 is required; $("$PYTHON" --version 2>&1) found (set PYTHON=...)" >&2
    exit 1
fi

echo "setup: preparing $VENV (first run takes about a minute)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
LOG="$VENV/setup.log"
: > "$LOG"
# pip's output goes to a log, shown only when a step fails.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }; }
pip install --upgrade pip
pip install "$TORCH_PIN"
pip install -e "$ROOT[test]"
"$VENV/bin/python" -c 'import torch, ray, hydra, prometheus_client, trainer' >/dev/null
echo "$want" > "$STAMP"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
