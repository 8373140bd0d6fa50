#!/usr/bin/env bash
# One call on a lent GPU machine: install, run every test (GPU ones included), tune and
# profile the Triton kernels, run the benchmark sweeps. Logs and CSV/JSON go to $OUT.
# STEPS picks among (STEPS="" only installs): tests compiled sanitize resources tune run fmap run32 run16 sweep infonce train train_compiled train_layouts train_graphs bench overhead host demo.
# Peer libraries: run `make peer-wheels` here first and carry wheels/ along.
set -u
OUT=${OUT:-/tmp/amdim_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
export MAX_JOBS=${MAX_JOBS:-16}
time python3 -m pip install -e . --no-build-isolation --no-deps -v 2>&1 | grep -E "amdim-kernels:|error|Successfully" | head -20
python3 -c "import amdim_kernels; print(amdim_kernels.build_info())"
# the peer libraries (make peer-wheels here, then carry wheels/ to the machine)
if ls wheels/*.whl >/dev/null 2>&1; then python3 -m pip install --no-deps --no-index -q wheels/*.whl; fi
STEPS=${STEPS-"tests sanitize resources tune run fmap overhead"}
IMPLS=${IMPLS:-"reference triton:fused triton:gemm cuda:cublas cuda:mma"}
for step in $STEPS; do
  case $step in
    # pytest-xdist, where installed (the GPU machine's image has it), spreads Triton's JIT compiles over the cores;
    # loadgroup keeps each xdist_group in one worker (the 2^31-element cases, 9-17 GB each, run one at a time).
    # Session 7's 586 tests took 222 s with 8 workers; the suite has grown since (run this step alone in a call).
    tests) workers=$(python3 -c "import xdist; print('-n 12 --dist loadgroup')" 2>/dev/null)
           timeout 480 python3 -m pytest -q -rfE --durations=20 $workers tests 2>&1 | tee "$OUT/pytest.log" | tail -45 ;;
    run) timeout 170 python3 -m benchmarks.run --preset targets --dtypes bfloat16 --impls $IMPLS --compile \
           --out "$OUT" --suffix bf16 2>&1 | tee "$OUT/run_bf16.log" ;;
    infonce) timeout 540 python3 -m benchmarks.run --preset infonce --dtypes bfloat16 --compile \
           --out "$OUT" --suffix infonce_bf16 2>&1 | tee "$OUT/run_infonce.log" ;;
    sweep) timeout 400 python3 -m benchmarks.run --preset sweep --dtypes bfloat16 --impls $IMPLS --compile \
           --out "$OUT" --suffix sweep_bf16 2>&1 | tee "$OUT/run_sweep.log" ;;
    train) timeout 300 python3 -m benchmarks.train_throughput --amp --backends reference triton cuda cuda:mma \
           --out "$OUT/train_throughput.csv" 2>&1 | tee "$OUT/train_throughput.log" ;;
    train_compiled) timeout 500 python3 -m benchmarks.train_throughput --amp --compile --backends reference triton cuda \
           --out "$OUT/train_throughput_compiled.csv" 2>&1 | tee "$OUT/train_throughput_compiled.log" ;;
    train_layouts) timeout 300 python3 -m benchmarks.train_throughput --amp --channels-last --backends reference triton cuda \
           --out "$OUT/train_throughput_cl.csv" 2>&1 | tee "$OUT/train_throughput_cl.log" ;;
    train_graphs) timeout 500 python3 -m benchmarks.train_throughput --amp --channels-last --compile \
           --compile-mode reduce-overhead --backends reference triton cuda \
           --out "$OUT/train_throughput_graphs.csv" 2>&1 | tee "$OUT/train_throughput_graphs.log" ;;
    bench) timeout 300 python3 -m pytest benchmarks --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
    demo) timeout 60 python3 -m benchmarks.demo 2>&1 | tee "$OUT/demo.log" ;;
    fmap) timeout 200 python3 -m benchmarks.run --preset feature-map --dtypes bfloat16 --impls $IMPLS \
           --out "$OUT" --suffix fmap_bf16 2>&1 | tee "$OUT/run_fmap.log" ;;
    run32) timeout 100 python3 -m benchmarks.run --preset targets --dtypes float32 --impls $IMPLS \
           --out "$OUT" --suffix fp32 2>&1 | tee "$OUT/run_fp32.log" ;;
    run16) timeout 170 python3 -m benchmarks.run --preset targets --dtypes float16 --impls $IMPLS \
           --out "$OUT" --suffix fp16 2>&1 | tee "$OUT/run_fp16.log" ;;
    compiled) timeout 120 python3 -m pytest -q -rfE tests/test_compiled.py 2>&1 | tee "$OUT/pytest_compiled.log" | tail -8 ;;
    sanitize) for tool in memcheck racecheck; do
                timeout 240 compute-sanitizer --tool $tool --print-limit 20 python3 -m benchmarks.sanitize_case 2>&1 \
                  | tee "$OUT/sanitize_$tool.log" | grep -E "ERROR SUMMARY|loss|Error" | head -8
              done ;;
    overhead) timeout 300 python3 -m benchmarks.host_overhead 2>&1 | tee "$OUT/host_overhead.log" | tail -30 ;;
    host) for flag in --split --objective --trace; do
            timeout 240 python3 -m benchmarks.host_overhead $flag 2>&1 | tee "$OUT/host${flag#--}.log" | tail -60
          done ;;
    resources) timeout 120 env -u TRITON_INTERPRET python3 -m benchmarks.triton_resources --arch 90 \
           --tiles 128,128,64,8,3,128,64 128,128,64,8,3,0,64 128,256,64,8,3,0,64 --loads tma pointers 2>&1 \
           | tee "$OUT/triton_resources.log" ;;
    tune) timeout 500 python3 -m benchmarks.tune_triton ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
  esac
done
