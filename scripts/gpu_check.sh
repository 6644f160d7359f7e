#!/usr/bin/env bash
# GPU check in one go, for a CUDA machine with torch preinstalled and no network:
#   builds the extension, runs the whole test suite (GPU tests included), a short benchmark,
#   optionally compute-sanitizer, and prints a summary table last.
# Usage: scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu_check_out)
#   GPU_CHECK_SANITIZER=1   also run the CUDA-backend tests under compute-sanitizer memcheck/racecheck
#   GPU_CHECK_NCU=1         also profile cuDNN's and the Triton conv's kernels on a few ResNet-50 shapes with ncu
#                           (scripts/ncu_convs.py; speed of light, occupancy, launch and warp-state sections)
#   GPU_CHECK_TESTS         pytest targets (default: tests), e.g. "tests/test_triton_conv.py tests/test_modules.py";
#                           the CPU emulation of the CUDA kernels (marker host_emulation) is left to CI
#   GPU_CHECK_BENCH_ARGS    arguments for python -m benchmarks (default: --quick), e.g.
#                           "--levels convs --models resnet50" (Triton conv vs cuDNN per ResNet-50 conv,
#                           forward and the training unit's conv backward),
#                           "--levels models --models resnet50,resnetv2_50" (pre-activation target),
#                           "--levels blocks,models --models resnet50 --backends auto,cuda,triton" (the
#                           measured conv choice of "auto" against each backend; results.json keeps the
#                           dispatch table: which conv won per shape, with both timings)
#   GPU_CHECK_PYTEST_ARGS   extra pytest arguments, e.g. "-n 12 --timeout 200" (pytest-xdist, pytest-timeout)
#   GPU_CHECK_TESTS_TIMEOUT, GPU_CHECK_BENCH_TIMEOUT   seconds before that step is stopped (default: no limit);
#                           the logs keep what ran, the benchmark log one line per finished row
#   GPU_CHECK_BUILD=0       skip the build and import fusedres from the checkout (a fusedres/_C*.so built
#                           earlier on this kind of machine, e.g. carried in from a previous call)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} FUSEDRES_BUILD_CUDA=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
declare -A result

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
limit() { if [ -n "${1:-}" ]; then echo "timeout $1"; fi; }
start=$SECONDS
if [ "${GPU_CHECK_BUILD:-1}" = 0 ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  result[build]="skipped (GPU_CHECK_BUILD=0): $(ls fusedres/_C*.so 2>/dev/null | tr '\n' ' ')"
else
  "$py" -m pip install --no-build-isolation --no-deps -v -e . > "$out/build.log" 2>&1
  result[build]="rc=$? in $((SECONDS - start)) s"
fi
"$py" -m fusedres info 2>&1 | tee "$out/info.txt"

# -v: one line per finished test, so a run stopped by its timeout still says what passed and failed
start=$SECONDS
# shellcheck disable=SC2086
$(limit "${GPU_CHECK_TESTS_TIMEOUT:-}") "$py" -m pytest ${GPU_CHECK_TESTS:-tests} -m "not host_emulation" -v -rfE \
  ${GPU_CHECK_PYTEST_ARGS:-} --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
result[tests]="rc=$? in $((SECONDS - start)) s: $(tail -1 "$out/tests.log" | cut -c1-200)"
result[tests]+=" ($(grep -c ' PASSED' "$out/tests.log") passed, $(grep -c ' FAILED' "$out/tests.log") failed lines)"

if [ "${GPU_CHECK_SANITIZER:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 99 "$py" -m pytest tests/test_cuda_backend.py -q -x -m "not host_emulation" \
      -k "not large" > "$out/sanitizer_$tool.log" 2>&1
    result[$tool]="rc=$? $(grep -E 'ERROR SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
  done
fi

# host time per Triton conv call, real kernels and stubbed ones (seconds): does the host keep up with small convs?
"$py" -m benchmarks.host_overhead > "$out/host_overhead.txt" 2>&1
result[host]="rc=$? $(tail -1 "$out/host_overhead.txt" | tr -s ' ')"

if [ "${GPU_CHECK_NCU:-0}" = 1 ]; then  # hardware counters of cuDNN's and the Triton conv's kernels, a few shapes
  ncu --profile-from-start off --clock-control none --nvtx --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --csv --page details "$py" scripts/ncu_convs.py \
    > "$out/ncu_convs.csv" 2> "$out/ncu_convs.log"
  result[ncu]="rc=$? ($out/ncu_convs.csv)"
fi

start=$SECONDS
# TRITON_PRINT_AUTOTUNING=1: bench.log names the config each new autotuning key chose (USE_TMA: which kind)
# shellcheck disable=SC2086
TRITON_PRINT_AUTOTUNING=1 $(limit "${GPU_CHECK_BENCH_TIMEOUT:-}") "$py" -m benchmarks ${GPU_CHECK_BENCH_ARGS:---quick} --out "$out" \
  > "$out/bench.log" 2>&1
result[bench]="rc=$? in $((SECONDS - start)) s (table: $out/results.md, rows so far: $out/bench.log)"

echo
cat "$out/results.md" 2>/dev/null | head -60
echo
grep -E "(^| )(FAILED|ERROR)( |$)" "$out/tests.log" | cut -c1-300 | sort -u | head -40
echo
echo "== gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)) =="
for step in build tests memcheck racecheck host ncu bench; do
  [ -n "${result[$step]:-}" ] && printf '%-10s %s\n' "$step" "${result[$step]}"
done
