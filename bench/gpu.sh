#!/usr/bin/env bash
# The `hnal bench score` table on a CUDA machine (< 5 minutes on one H100/H200), with the bf16 and
# TF32 variants and their selection recall against float32, and the exact fp16/bf16 path
# (hnal_ray.score.lowprec: its time, its band share, and the bare fp16/bf16 GEMM beside it), and
# `hnal bench select` (TypiClust at pool scale against the Surplus score).
# Not run yet: no GPU has been lent to a session that had this script. Writes
# bench-gpu.{txt,json} to $OUT_DIR.
#
#   bench/gpu.sh                      # defaults below
#   POOL=2000000 TEXTS=100000 bench/gpu.sh
#
# The benchmark itself needs no GPU: this is the same command with GPU-sized defaults and
# --device cuda. FAISS range_search and the numpy peer stay on the CPU (FAISS has no GPU
# range_search for flat indexes), so their pool sizes are the growth sizes, kept moderate.
set -euo pipefail
cd "$(dirname "$0")/.."

POOL=${POOL:-1000000}
TEXTS=${TEXTS:-50000}
DIM=${DIM:-256}
SIZES=${SIZES:-62500,250000,1000000}
OUT_DIR=${OUT_DIR:-.}
PY=${PYTHON:-python}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

export PYTHONUNBUFFERED=1
start=$(date +%s)
# the GPU tests first: the kernels on CUDA equal the CPU's, and the exact fp16/bf16 path on real
# tensor cores equals the float64 reference (skipped everywhere else)
"$PY" -m pytest -q -m gpu tests/test_gpu.py | tee "$OUT_DIR/tests-gpu.txt"
# the same table as `hnal bench score ...` (python -m works whether or not the CLI wiring exists)
"$PY" -m hnal_ray.bench score --device cuda \
    --pool "$POOL" --texts "$TEXTS" --dim "$DIM" --sizes "$SIZES" \
    --naive-pool 16384 --approx 1:32,4:64,16:128 --precisions bf16,tf32,exact-fp16,exact-bf16 \
    --json "$OUT_DIR/bench-gpu.json" | tee "$OUT_DIR/bench-gpu.txt"
# TypiClust at pool scale (hnal bench select): the FAISS fit on the GPU build, the exact
# assignment's GEMM on CUDA, against the Surplus score of the same pool; SELECT_SIZES=0 skips it
SELECT_SIZES=${SELECT_SIZES:-1000000}
if [ "$SELECT_SIZES" != 0 ]; then
  "$PY" -m hnal_ray.bench select --root "${SELECT_ROOT:-/tmp/hnal-bench-select}" --sizes "$SELECT_SIZES" \
      --images 100000 --budget 10000 --dim "$DIM" --actors 1 --shard-rows 250000 --quality 1000000 \
      --json "$OUT_DIR/bench-select-gpu.json" | tee "$OUT_DIR/bench-select-gpu.txt"
fi
echo "bench/gpu.sh: $(( $(date +%s) - start ))s" | tee -a "$OUT_DIR/bench-gpu.txt"
