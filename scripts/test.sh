#!/usr/bin/env bash
# Set up .venv if needed, then lint, type-check and run the test suite.
#   scripts/test.sh                  the default suite (what CI runs)
#   scripts/test.sh --slow           also the slow tests (soak runs)
#   scripts/test.sh -k checkpoint    extra arguments go to pytest
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY="$ROOT/.venv/bin"

marker=(-m "not slow")
args=()
for arg in "$@"; do
    if [[ "$arg" == "--slow" ]]; then marker=(); else args+=("$arg"); fi
done

echo "== ruff"
"$PY/ruff" check trainer monitoring tests scripts
"$PY/ruff" format --check trainer monitoring tests scripts
echo "== mypy"
"$PY/mypy"
echo "== pytest"
"$PY/pytest" "${marker[@]}" "${args[@]}"
