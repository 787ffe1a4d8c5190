#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run, from the repository root of a machine with one:
#   - the adapter conformance, read-ahead and non-finite unit tests (the CUDA checks run there, skip here;
#     among them: a step with a fused optimizer makes no synchronising call);
#   - scripts/bench/overhead.py --device cuda [--fused]: the toolkit's step, in-process and on Ray, against
#     a plain loop of the same model on the GPU, first all with AdamW's fused kernel (then one profiled run
#     of each side: profile_cuda_fused.txt), then with its default kernel;
#   - scripts/bench/checkpoint.py --device cuda: what a save blocks and what training loses to it, against
#     the measured device-to-host copy time of the state: a 1536-wide model, steps of 64 x 128 tokens (the
#     forward and backward take about as long as the copy they overlap with), then a 512-wide deep one.
# Needs PyTorch with CUDA, pytest, numpy, xxhash, prometheus-client, hydra-core, omegaconf and ray. Where
# some are missing, give a tarball of a site-packages folder holding them (unpacked to /tmp/site, put on
# PYTHONPATH), e.g. built with `pip download --python-version 3.12 ...` and unzipped.
#   scripts/bench/gpu_checks.sh OUT_DIR [SITE_TARBALL]
# Writes gpu.txt, tests.txt, overhead_cuda*.json, profile_cuda_fused.txt, checkpoint_cuda*.json and their
# .log files into OUT_DIR.
set -uo pipefail
out=${1:?usage: scripts/bench/gpu_checks.sh OUT_DIR [SITE_TARBALL]}
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
if [ -n "${2:-}" ]; then
    mkdir -p /tmp/site && tar xzf "$2" -C /tmp/site && export PYTHONPATH="/tmp/site:$PWD"
fi
py=${PYTHON:-python3}
# Without an install of the project, its Hydra configs (packaged as trainer.conf) are the repository's conf/.
"$py" -c 'import trainer.conf' 2>/dev/null || ln -s ../conf trainer/conf
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
"$py" -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0], "cpus", __import__("os").cpu_count())' >>"$out/gpu.txt" 2>&1
timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/unit/test_adapter_conformance.py tests/unit/test_prefetch.py tests/unit/test_staging_cuda.py \
    tests/unit/test_step_sync_cuda.py tests/unit/test_nonfinite_on_device.py \
    >"$out/tests.txt" 2>&1
echo "tests: exit $?" >>"$out/tests.txt"
# AdamW's fused kernel in every loop: the toolkit's step then never waits for the device. Then one profiled
# run of each side (top operators), where the ratio is above its goal.
timeout 220 "$py" scripts/bench/overhead.py --device cuda --fused --steps "${STEPS:-200}" --repeats "${REPEATS:-3}" \
    --profile "$out/profile_cuda_fused.txt" \
    >"$out/overhead_cuda_fused.json" 2>"$out/overhead_cuda_fused.log"
echo "overhead fused: exit $?" >>"$out/gpu.txt"
# The same with AdamW's default (foreach) kernel: the toolkit's non-finite check then reads one flag per step.
timeout 220 "$py" scripts/bench/overhead.py --device cuda --steps "${STEPS:-200}" --repeats "${REPEATS:-3}" \
    >"$out/overhead_cuda.json" 2>"$out/overhead_cuda.log"
echo "overhead: exit $?" >>"$out/gpu.txt"
timeout 150 "$py" scripts/bench/checkpoint.py --device cuda --megabytes "${MEGABYTES:-2000}" --repeats "${REPEATS:-3}" \
    --width 1536 --batch "${BATCH:-64}" --seq 128 \
    >"$out/checkpoint_cuda.json" 2>"$out/checkpoint_cuda.log"
echo "checkpoint: exit $?" >>"$out/gpu.txt"
# The same state in a narrow, deep model (512 wide): a step of thousands of small kernels, bound by the host.
timeout 120 "$py" scripts/bench/checkpoint.py --device cuda --megabytes "${MEGABYTES:-2000}" --repeats 2 \
    --width 512 --batch 32 --seq 128 \
    >"$out/checkpoint_cuda_narrow.json" 2>"$out/checkpoint_cuda_narrow.log"
echo "checkpoint narrow: exit $?" >>"$out/gpu.txt"
cat "$out"/*.json "$out/gpu.txt"
