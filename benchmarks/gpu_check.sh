#!/usr/bin/env bash
# One call on a lent GPU machine: install, run every test (GPU ones included), tune and
# profile the Triton kernels, run the benchmark sweep. Logs and CSV/JSON go to $OUT.
set -u
OUT=${OUT:-/tmp/amdim_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
python3 -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -2
STEPS=${STEPS:-"tests tune run"}
for step in $STEPS; do
  case $step in
    tests) timeout 240 python3 -m pytest -q -rfE tests 2>&1 | tee "$OUT/pytest.log" | tail -25 ;;
    tune) timeout 240 python3 -m benchmarks.tune_triton --profile ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
    run) timeout 300 python3 -m benchmarks.run --preset ${PRESET:-targets} ${RUN_ARGS:---dtypes bfloat16 --compile} --out "$OUT" 2>&1 | tee "$OUT/run.log" ;;
  esac
done
