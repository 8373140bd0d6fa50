#!/usr/bin/env bash
# One call on a lent GPU machine: install, run every test (GPU ones included), tune and
# profile the Triton kernels, run the benchmark sweep. Logs and CSV/JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/amdim_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
python3 -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -2
STEPS=${STEPS:-"tests run demo run32 tune"}
IMPLS="reference triton:fused triton:gemm"
for step in $STEPS; do
  case $step in
    tests) timeout 150 python3 -m pytest -q -rfE tests 2>&1 | tee "$OUT/pytest.log" | tail -25 ;;
    run) timeout 170 python3 -m benchmarks.run --preset targets --dtypes bfloat16 --impls $IMPLS --compile \
           --out "$OUT" --suffix bf16 2>&1 | tee "$OUT/run_bf16.log" ;;
    demo) timeout 60 python3 -m benchmarks.demo 2>&1 | tee "$OUT/demo.log" ;;
    run32) timeout 100 python3 -m benchmarks.run --preset targets --dtypes float32 --impls $IMPLS \
           --out "$OUT" --suffix fp32 2>&1 | tee "$OUT/run_fp32.log" ;;
    tune) timeout 100 python3 -m benchmarks.tune_triton ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
  esac
done
