#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a lent GPU machine (run from the repository root):
#   bash benchmarks/gpu_suite.sh OUTDIR            (on the device tool: GPU_SUITE_TAR=$OUT/gpu_out.tgz bash ...)
# Steps run in order of value per minute (GPU tests, kernels, tp block, fp8, checkpoint stall, training MFU); each
# writes OUTDIR/NAME.log, a failed step does not stop the others, and OUTDIR/summary.txt gets one line per step. Copy
# the figures into benchmarks/RESULTS.md with the device and date.
set -u
out=${1:-${OUT:-gpu_out}}
py=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU image names its interpreter python3
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install`: torch, triton, tokenizers, pytest
# and pybind11 are in the GPU image (device KINDS.md)
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: torch sees no CUDA device; nothing to do" >&2
    exit 2
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"

# The logs travel back as one tarball, rewritten after each step, when GPU_SUITE_TAR names it: a call stopped at its
# time limit still returns what the finished steps wrote.
snapshot() {
    if [ -n "${GPU_SUITE_TAR:-}" ]; then tar czf "$GPU_SUITE_TAR" -C "$out" . 2>/dev/null; fi
}

# step NAME SECONDS CMD...: each step has its own time limit, so one that hangs does not starve the others.
step() {
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "$name rc=$rc $((SECONDS - start))s: $*" | tee -a "$out/summary.txt"
    snapshot
}

# pytest-xdist compiles the Triton kernels of different tests in parallel (16 cores there, compile-bound).
workers=()
if "$py" -c "import xdist" 2>/dev/null; then workers=(-n 8); fi

step build_ext 40 "$py" setup.py -q build_ext --inplace  # the C++ data index; NumPy fallback if it fails
step gpu_tests 150 "$py" -m pytest -q -p no:cacheprovider "${workers[@]}" -m gpu tests
step kernels 230 "$py" -m benchmarks.kernels --csv "$out/kernels.csv"
step tp_block 60 "$py" -m benchmarks.bench_tp --gpu
step fp8 150 "$py" -m benchmarks.bench_fp8 --json "$out/fp8.json"
# ~40 s estimated: two 0.7B-parameter Llama models with a 128k vocabulary (built on the GPU), 6 steps of 8192 tokens
# each, plus compiling our kernels; needs transformers in the image (else one line and rc 2).
step hf_kernels 120 "$py" -m benchmarks.bench_hf_kernels --json "$out/hf_kernels.json"
# ~35 s estimated: CUDA start, 1 GB state, 2 repeats x (3 saves + 4 loads) at ~1 GB/s of disk, ~25 training steps of
# ~0.17 s (batch 16384, see the bench's docstring) around one async save; its table (stall % of a step) is the log tail.
step checkpoint 60 "$py" -m benchmarks.bench_checkpoint --device cuda --size-gb 1 --repeats 2 \
    --json "$out/checkpoint.json"
step train 150 "$py" -m benchmarks.bench_train --gpu-suite --steps 6 --repeats 1 --json "$out/train.json"
echo "== summary"
cat "$out/summary.txt"
