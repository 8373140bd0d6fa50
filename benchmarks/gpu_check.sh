#!/usr/bin/env bash
# One call on a GPU machine: build the extension, then the default steps, which fit 9 minutes
# on one H100/H200 with the build: the GPU tests of every GPU path but the 2^31-element ones
# (gpu_tests), compute-sanitizer's memcheck on one case per score path (sanitize), the main
# timing table (run), then the 2^31-element tests, 2-17 GB each, one at a time (gpu_large).
# Logs and CSV/JSON go to $OUT. Every step's timeout is cut to what is left of BUDGET_S
# (default 530 s from the start), so the call ends in time whatever a step does; a pytest step
# cut short gets SIGINT first, so that it still prints its summary of what ran.
# STEPS picks among (STEPS="" only builds): gpu_tests sanitize run gpu_large tests extension
# sanitize_all resources tune fmap run32 run16 sweep infonce train train_compiled train_layouts
# train_graphs bench overhead host demo.
# Peer libraries: run `make peer-wheels` on a machine with network first and carry wheels/ along.
#   STEPS="gpu_tests sanitize run gpu_large" OUT=/tmp/out bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/amdim_out}; mkdir -p "$OUT"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-530} ))
# seconds a step may take: its own cap, or what is left of the budget if that is less
cap() { local left=$(( DEADLINE - $(date +%s) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
export MAX_JOBS=${MAX_JOBS:-16}
time timeout $(cap 240) python3 -m pip install -e . --no-build-isolation --no-deps -v 2>&1 \
  | grep -E "amdim-kernels:|error|Successfully" | head -20
python3 -c "import amdim_kernels; print(amdim_kernels.build_info())"
# the peer libraries (make peer-wheels here, then carry wheels/ to the machine)
if ls wheels/*.whl >/dev/null 2>&1; then python3 -m pip install --no-deps --no-index -q wheels/*.whl; fi
STEPS=${STEPS-"gpu_tests sanitize run gpu_large"}
LARGE="past_2_31_elements or more_column_tiles"  # the tests of xdist_group past_2_31
IMPLS=${IMPLS:-"reference triton:fused triton:gemm triton:3p cuda:cublas cuda:mma cuda:3p"}
for step in $STEPS; do
  case $step in
    # pytest-xdist, where installed (the GPU machine's image has it), spreads Triton's JIT compiles over the cores;
    # loadgroup keeps each xdist_group in one worker (the 2^31-element cases, 9-17 GB each, run one at a time).
    # gpu_tests: the tests marked gpu (every GPU path; the CPU ones run in CI) but the large ones;
    # gpu_large: those; tests: the whole suite.
    gpu_tests) workers=$(python3 -c "import xdist; print('-n 8 --dist loadgroup')" 2>/dev/null)
           timeout -s INT -k 20 $(cap 220) python3 -m pytest -q -rfE -m gpu -k "not ($LARGE)" --durations=15 \
             $workers tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40 ;;
    gpu_large) timeout -s INT -k 20 $(cap 300) python3 -m pytest -q -rfE -m gpu -k "$LARGE" --durations=10 tests 2>&1 \
             | tee "$OUT/pytest_gpu_large.log" | tail -25 ;;
    tests) workers=$(python3 -c "import xdist; print('-n 12 --dist loadgroup')" 2>/dev/null)
           timeout -s INT -k 20 $(cap 480) python3 -m pytest -q -rfE --durations=20 $workers tests 2>&1 \
             | tee "$OUT/pytest.log" | tail -45 ;;
    run) timeout $(cap 200) python3 -m benchmarks.run --preset targets --dtypes bfloat16 --impls $IMPLS --compile \
           --out "$OUT" --suffix bf16 2>&1 | tee "$OUT/run_bf16.log" ;;
    infonce) timeout $(cap 540) python3 -m benchmarks.run --preset infonce --dtypes bfloat16 --compile \
           --out "$OUT" --suffix infonce_bf16 2>&1 | tee "$OUT/run_infonce.log" ;;
    sweep) timeout $(cap 400) python3 -m benchmarks.run --preset sweep --dtypes bfloat16 --impls $IMPLS --compile \
           --out "$OUT" --suffix sweep_bf16 2>&1 | tee "$OUT/run_sweep.log" ;;
    train) timeout $(cap 300) python3 -m benchmarks.train_throughput --amp --backends reference triton cuda cuda:mma \
           --out "$OUT/train_throughput.csv" 2>&1 | tee "$OUT/train_throughput.log" ;;
    train_compiled) timeout $(cap 500) python3 -m benchmarks.train_throughput --amp --compile --backends reference triton cuda \
           --out "$OUT/train_throughput_compiled.csv" 2>&1 | tee "$OUT/train_throughput_compiled.log" ;;
    train_layouts) timeout $(cap 300) python3 -m benchmarks.train_throughput --amp --channels-last --backends reference triton cuda \
           --out "$OUT/train_throughput_cl.csv" 2>&1 | tee "$OUT/train_throughput_cl.log" ;;
    train_graphs) timeout $(cap 500) python3 -m benchmarks.train_throughput --amp --channels-last --compile \
           --compile-mode reduce-overhead --backends reference triton cuda \
           --out "$OUT/train_throughput_graphs.csv" 2>&1 | tee "$OUT/train_throughput_graphs.log" ;;
    bench) timeout $(cap 300) python3 -m pytest benchmarks --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
    demo) timeout $(cap 60) python3 -m benchmarks.demo 2>&1 | tee "$OUT/demo.log" ;;
    fmap) timeout $(cap 200) python3 -m benchmarks.run --preset feature-map --dtypes bfloat16 --impls $IMPLS \
           --out "$OUT" --suffix fmap_bf16 2>&1 | tee "$OUT/run_fmap.log" ;;
    run32) timeout $(cap 100) python3 -m benchmarks.run --preset targets --dtypes float32 --impls $IMPLS \
           --out "$OUT" --suffix fp32 2>&1 | tee "$OUT/run_fp32.log" ;;
    run16) timeout $(cap 170) python3 -m benchmarks.run --preset targets --dtypes float16 --impls $IMPLS \
           --out "$OUT" --suffix fp16 2>&1 | tee "$OUT/run_fp16.log" ;;
    extension) timeout $(cap 120) python3 -m pytest -q -rfE tests/test_extension_ops.py 2>&1 \
                 | tee "$OUT/pytest_extension.log" | tail -8 ;;
    sanitize) timeout $(cap 120) compute-sanitizer --tool memcheck --print-limit 20 python3 -m benchmarks.sanitize_case \
                --one 2>&1 | tee "$OUT/sanitize_memcheck.log" | grep -E "ERROR SUMMARY|loss|Error" | head -12 ;;
    sanitize_all) for tool in memcheck racecheck; do
                timeout $(cap 240) compute-sanitizer --tool $tool --print-limit 20 python3 -m benchmarks.sanitize_case 2>&1 \
                  | tee "$OUT/sanitize_$tool.log" | grep -E "ERROR SUMMARY|loss|Error" | head -8
              done ;;
    overhead) timeout $(cap 300) python3 -m benchmarks.host_overhead 2>&1 | tee "$OUT/host_overhead.log" | tail -30 ;;
    host) for flag in --split --objective --trace; do
            timeout $(cap 240) python3 -m benchmarks.host_overhead $flag 2>&1 | tee "$OUT/host${flag#--}.log" | tail -60
          done ;;
    resources) timeout $(cap 120) env -u TRITON_INTERPRET python3 -m benchmarks.triton_resources --arch 90 \
           --tiles 128,128,64,8,3,128,64 128,128,64,8,3,0,64 128,256,64,8,3,0,64 --loads tma pointers 2>&1 \
           | tee "$OUT/triton_resources.log" ;;
    tune) timeout $(cap 500) python3 -m benchmarks.tune_triton ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
  esac
done
echo "gpu_check: done with $(( DEADLINE - $(date +%s) )) s of the budget left"
