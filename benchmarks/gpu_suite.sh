#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU machine (run from the repository root):
#   bash benchmarks/gpu_suite.sh OUTDIR
# Steps run in order of value per minute (GPU tests, kernels, tp block, training MFU); each writes OUTDIR/NAME.log,
# a failed step does not stop the others, and OUTDIR/summary.txt gets one line per step. Copy the figures into
# benchmarks/RESULTS.md with the device and date.
set -u
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install`: torch, triton, tokenizers, pytest
# and pybind11 are in the GPU image (device KINDS.md)
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: torch sees no CUDA device; nothing to do" >&2
    exit 2
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"

step() {
    local name=$1; shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$out/$name.log"
    echo "$name rc=$rc $((SECONDS - start))s: $*" | tee -a "$out/summary.txt"
}

step build_ext python setup.py -q build_ext --inplace  # the C++ data index; NumPy fallback if it fails
step gpu_tests python -m pytest -q -m gpu tests
step kernels python -m benchmarks.kernels --csv "$out/kernels.csv"
step tp_block python -m benchmarks.bench_tp --gpu
step train python -m benchmarks.bench_train --gpu-suite --steps 6 --repeats 1 --json "$out/train.json"
echo "== summary"
cat "$out/summary.txt"
