#!/usr/bin/env bash
# GPU check for stager: the GPU tests and the GPU rows of `stager bench`, on one CUDA machine.
#
# For a machine like the H200 boxes: Python 3.12 with torch (and pytest, pytest-timeout) already
# installed, but no Rust and no network. The wheel is built beforehand on a CPU machine:
#
#     . /work/venv/bin/activate && maturin build --release -o dist    # dist/stager-*-cp311-abi3-*.whl
#
# then the repository (with dist/, which git ignores: the device tool needs carry ["dist"]) goes to
# the GPU machine and this runs there:
#
#     scripts/gpu_check.sh OUT_DIR
#
# Everything lands in OUT_DIR: env.txt (machine, GPU, driver, versions), install.log,
# pytest_gpu.log + pytest_gpu.xml (`pytest -m gpu tests/test_gpu.py tests/test_filesystem.py`), pytest_cpu_with_cuda.log
# (the staging tests and the CUDA-absent tests, now with CUDA and pinned pools present),
# bench_gpu.log + bench_gpu.json (`stager bench --sections gpu`), bench_training_gpu.log +
# bench_training_gpu.json (`stager bench --sections training` with STAGER_BENCH_TRAINING_DEVICE=cuda:
# the training-loop KPI with CUDA tensors, NCCL for training and gloo for dcp, one rank per GPU, at
# most 2), summary.txt (exit codes).
# Each step is bounded by `timeout` (60 + 180 + 60 + 210 + 150 s): the script ends within 11.5
# minutes at worst.
# Copy OUT_DIR to benches/results/<date>-<gpu>/ and commit it (benches/results/README.md).
#
# Environment: PYTHON (default python3), BENCH_SIZE (default 2GB; larger takes longer, and whether
# 4GB fits the bench step's time limit has not been tried), BENCH_REPEATS (default 3),
# TRAINING_BENCH (STAGER_BENCH_TRAINING for the training step, default "steps=6"; rounds: 1).
set -uo pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

step() { # name, limit in seconds, command...: runs with a time limit, records the exit code
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start))s (limit ${limit}s)" | tee -a "$SUMMARY"
    return $rc
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    uname -a
    nproc
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv 2>&1
    nvidia-smi topo -m 2>&1 | head -20
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count()); [print("gpu", i, torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]' 2>&1
} >"$OUT/env.txt" 2>&1

# Install the prebuilt wheel into a private folder: the system's packages stay untouched.
WHEEL=$(ls -t dist/stager-*.whl 2>/dev/null | head -1)
if [ -z "$WHEEL" ]; then
    echo "no dist/stager-*.whl: build it first with 'maturin build --release -o dist'" | tee -a "$SUMMARY"
    exit 2
fi
SITE=$(mktemp -d)/site
step install 60 "$PY" -m pip install --no-deps --no-index --no-compile --target "$SITE" "$WHEEL" >"$OUT/install.log" 2>&1 || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
"$PY" -c 'import stager, stager._native as n; print("stager", stager.__file__); print("cuda_available", n.cuda_available(), "devices", n.cuda_device_count(), "reason", n.cuda_unavailable_reason())' >>"$OUT/env.txt" 2>&1

status=0
# Tests run from tests/ so `import stager` is the installed wheel, not python/ in the checkout.
cd "$ROOT/tests"
step pytest_gpu 180 "$PY" -m pytest -q -p no:cacheprovider --timeout=150 -m gpu -rs \
    --junitxml="$OUT/pytest_gpu.xml" test_gpu.py test_filesystem.py >"$OUT/pytest_gpu.log" 2>&1 || status=1
step pytest_cpu_with_cuda 60 "$PY" -m pytest -q -p no:cacheprovider --timeout=60 -m "not gpu" -rs \
    test_gpu.py test_staging.py >"$OUT/pytest_cpu_with_cuda.log" 2>&1 || status=1
cd "$ROOT"
step bench_gpu 210 "$PY" -m stager.cli bench --sections gpu --size "${BENCH_SIZE:-2GB}" \
    --repeats "${BENCH_REPEATS:-3}" --no-progress --json "$OUT/bench_gpu.json" >"$OUT/bench_gpu.log" 2>&1 || status=1
STAGER_BENCH_TRAINING_DEVICE=cuda STAGER_BENCH_TRAINING="${TRAINING_BENCH:-steps=6}" \
    step bench_training_gpu 150 "$PY" -m stager.cli bench --sections training --repeats 1 --no-progress \
    --json "$OUT/bench_training_gpu.json" >"$OUT/bench_training_gpu.log" 2>&1 || status=1

echo "overall: exit $status" | tee -a "$SUMMARY"
exit $status
