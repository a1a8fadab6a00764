#!/usr/bin/env bash
# One-shot GPU check for a machine with a CUDA GPU and a plain python3 holding torch, triton,
# torchvision and pytest (no network, no pip). Run from anywhere; results go under $OUT
# (default ./gpu_check_out). Every step has its own time limit and a failed step is recorded
# and the run goes on. Exit status: 0 when every step passed, 1 when one failed, 2 when there
# is no CUDA device. STEPS (space-separated step names, default all) runs a subset, e.g. to fit
# two short leases; BENCH_FILTER is a pytest -k expression for the benchmark step.
# Measured on an H200 (2026-11-30, docs/PERFORMANCE.md): tiny paper build 56 s, the eager probe
# cases 45 s, compiling the paper models more than 2 minutes, the kernel tests more than 150 s;
# the step limits add up to about 17 minutes, more than one 10-minute lease: split with STEPS.
#
#   OUT=/tmp/gpu tools/gpu_check.sh
#   STEPS="kernel_tests tiny_data tiny_paper_build precision_gate runtime_probe" tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the kernels must compile for the GPU, not run in the interpreter
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0

if ! "$PY" -c 'import torch' 2> /dev/null; then
    echo "gpu_check: $PY cannot import torch (set PYTHON to a python that has it)" | tee "$SUMMARY" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: needs a CUDA device; torch sees none (nothing was run)" | tee "$SUMMARY" >&2
    exit 2
fi

# step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
        return 0
    fi
    start=$(date +%s)
    echo "== $name" >&2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $(( $(date +%s) - start )) s" \
        | tee -a "$SUMMARY" >&2
    [ $rc -eq 0 ] || failed=1
}

{
    date -u +%Y-%m-%dT%H:%MZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
    git rev-parse --short=12 HEAD 2>/dev/null || echo "commit unknown"
} > "$OUT/env.txt" 2>&1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # data and artifact: ours alone, removed
trap 'rm -rf "$WORK"' EXIT
DATA=$WORK/data
ARTIFACT=$WORK/artifact
step tiny_data 30 "$PY" -m tools.make_synthetic --out "$DATA" --category pushpins \
    --n-train 16 --n-validation 4 --n-test 8 --no-progress
step tiny_paper_build 120 "$PY" -m engine.build --category pushpins --data-root "$DATA" \
    --out "$ARTIFACT" --preset paper --device cuda --weights random --allow-random-weights \
    --text-prior learned --epochs 1 --no-progress
step precision_gate 60 "$PY" -m tools.precision_gate --artifact "$ARTIFACT" \
    --data-root "$DATA" --category pushpins --device cuda --out "$OUT/precision_gate.json"
step runtime_probe 300 "$PY" -m tools.gpu_probe --artifact "$ARTIFACT" --out "$OUT"
step kernel_tests 240 "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable --durations=15 \
    -m "gpu or not slow" --junitxml="$OUT/kernel_tests.xml" tests/kernels
step gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider --benchmark-disable -m gpu \
    --ignore=tests/kernels --junitxml="$OUT/gpu_tests.xml" tests
FILTER=()
[ -n "${BENCH_FILTER:-}" ] && FILTER=(-k "$BENCH_FILTER")
step benchmarks 200 "$PY" -m pytest -q -p no:cacheprovider benchmarks --benchmark-only \
    "${FILTER[@]}" --benchmark-json="$OUT/benchmarks.json"
cat "$SUMMARY"
exit $failed
