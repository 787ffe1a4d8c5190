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

# promtool (alert rules, prometheus.yml) and the prometheus server (integration test) come from Debian's
# prometheus package. Installing it is best effort but loud: without it those tests skip, saying why.
ensure_prometheus() {
    if command -v promtool >/dev/null; then
        promtool --version 2>&1 | head -n 1 || true
        return 0
    fi
    local sudo=()
    if [[ "$(id -u)" -ne 0 ]]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "WARNING: promtool is missing and installing Debian's prometheus package needs root or" \
                "passwordless sudo; the promtool and Prometheus tests will be SKIPPED" \
                "(install it: apt-get install --no-install-recommends prometheus)" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null; then
        echo "WARNING: promtool is missing and there is no apt-get to install Debian's prometheus package;" \
            "the promtool and Prometheus tests will be SKIPPED" >&2
        return 0
    fi
    # The package would start a system Prometheus listening on :9090; a policy-rc.d answering 101 is Debian's
    # way to keep an install from starting services. Put one there only for the install if there is none.
    local policy=/usr/sbin/policy-rc.d placed="" log
    if [[ ! -e "$policy" ]] && printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null; then
        "${sudo[@]}" chmod +x "$policy" && placed=1
    fi
    log="$(mktemp)"
    if { "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
        echo "installed $(promtool --version 2>&1 | head -n 1)"
    else
        echo "WARNING: installing Debian's prometheus package failed; the promtool and Prometheus tests will" \
            "be SKIPPED. apt-get said:" >&2
        tail -n 20 "$log" >&2
    fi
    rm -f "$log"
    if [[ -n "$placed" ]]; then "${sudo[@]}" rm -f "$policy"; fi
    # Whatever the install did, leave no system Prometheus running: the tests start their own on 127.0.0.1.
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
        "${sudo[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
    elif [[ -x /etc/init.d/prometheus ]] && "${sudo[@]}" /etc/init.d/prometheus status >/dev/null 2>&1; then
        "${sudo[@]}" /etc/init.d/prometheus stop >/dev/null ||
            echo "WARNING: the prometheus package started a daemon that could not be stopped" >&2
    fi
    return 0
}

marker=(-m "not slow")
args=()
for arg in "$@"; do
    if [[ "$arg" == "--slow" ]]; then marker=(); else args+=("$arg"); fi
done

echo "== ruff"
"$PY/ruff" check trainer monitoring tests scripts examples
"$PY/ruff" format --check trainer monitoring tests scripts examples
echo "== mypy"
"$PY/mypy"
echo "== prometheus"
ensure_prometheus
echo "== pytest"
# The slowest tests are listed at the end: what to move under --slow when the suite grows.
"$PY/pytest" --durations=25 "${marker[@]}" "${args[@]}"
