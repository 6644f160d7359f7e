#!/usr/bin/env bash
# GPU check in one go, for a CUDA machine with torch preinstalled and no network, sized by default for one
# device call of under 10 minutes (a session has 15 minutes of device time, the machine's start included):
#   the CUDA extension (carried from scripts/device_prep.sh where it imports, else built), the Triton kernels'
#   GPU tests, the convs benchmark level, the models level (ResNet-50), then a summary table, last.
# Usage: scripts/gpu_check.sh [WORK_DIR]   (default /tmp/gpu_check; with $OUT set, everything is packed into
#        $OUT/gpu_check.tgz and the summary copied to $OUT/summary.txt)
#   Prepared on the CPU machine first (scripts/device_prep.sh), carried by the call:
#     .device/triton-cache.tgz   Triton kernels compiled for sm_90 by the GPU image's triton: unpacked into the
#                                Triton cache, so the tests' and benchmarks' first calls load instead of compile;
#                                the summary says how many kernels were compiled here all the same
#     fusedres/_C.cpython-312-x86_64-linux-gnu.so   the extension, used when it imports (no ~97 s build)
#   GPU_CHECK_TESTS         pytest targets (default: the Triton kernels' (stages, per-channel functions, convs),
#                           the dispatch's result checks', the
#                           inference ops', the modules', fusedres.precompile's and fusedres.cuda_graphed's tests,
#                           the converted stem's GPU test);
#                           "tests" for all; the CPU emulation of the CUDA kernels (marker host_emulation) is CI's
#   GPU_CHECK_TESTS_K       a pytest -k expression selecting among those tests (default: all of them), e.g.
#                           "space_to_depth or stats or gpu_"
#   GPU_CHECK_PYTEST_ARGS   extra pytest arguments (default: "-n 8 --timeout 120", pytest-xdist and -timeout)
#   GPU_CHECK_TESTS_TIMEOUT seconds before the tests are stopped (default 130; the log keeps what ran, and pytest,
#                           stopped as by Ctrl-C, still prints the failures so far; on an H200 the default tests
#                           took longer: ~620 of ~1000 ran in 100 s, 2026-12-04)
#   GPU_CHECK_BENCH         ";"-separated runs of python -m benchmarks, each "SECONDS ARGS..." (default: the convs
#                           level's forward rows, those with targets, for 100 s (75 s on an H200), ResNet-50 inference at
#                           batch 256 and 1 for 100 s (74 s), its training step at 256 for 190 s (140 s did not
#                           reach torch.compile's row), eager vs fused "auto" vs
#                           torch.compile, the fused model precompiled
#                           (fusedres.precompile: its row's "precompile s", then "first call s" is timing alone),
#                           and in inference fused "auto" replayed from a CUDA graph (fused[auto]+graph), in
#                           training (after compile's row) with its activations saved (fused[auto]+saved);
#                           with the tests about 9 minutes);
#                           e.g. "300 --levels blocks --models resnet50" or
#                           "300 --levels convs --models resnet50 --modes bwd" (Triton conv backward vs cuDNN's) or
#                           "300 --levels models --models resnet50,resnetv2_50" (pre-activation target) or
#                           "300 --levels convs --models resnext50_32x4d" (grouped convs: narrow groups merged)
#                           A run whose command a file of benchmarks/baselines/ recorded is compared with it
#                           (python -m benchmarks.compare: benchN/compare.md, and in the summary)
#   GPU_CHECK_HOST=1        also time the host side of a Triton conv call (python -m benchmarks.host_overhead)
#   GPU_CHECK_SWEEP=1       also run every forward conv config alone on ResNet-50 launches and the tests' TMA cases
#                           (scripts/conv_config_sweep.py, ~1-2 min): a wrong config the autotuner did not pick
#                           this time shows there, with whether conv_configs._usable lets it run
#   GPU_CHECK_PROFILE=1     also profile the converted ResNet-50's inference forward at batch 256 (host vs GPU time
#                           a forward, host time per module, torch.profiler's ops by CPU and GPU time, host waits;
#                           scripts/profile_model.py, ~1 min with the kernels carried); "infer,train" (or "train")
#                           profiles its training step at batch 256 too (or instead), "infer@1" the forward at batch 1
#   GPU_CHECK_SANITIZER=1   also run the CUDA-backend tests under compute-sanitizer memcheck/racecheck
#   GPU_CHECK_NCU=1         also profile cuDNN's and the Triton conv's kernels on a few ResNet-50 shapes with ncu
#                           (scripts/ncu_convs.py; speed of light, occupancy, launch, warp-state and memory sections;
#                           stopped after GPU_CHECK_NCU_TIMEOUT seconds, default 90)
#   GPU_CHECK_BUILD         auto (default): use a carried extension that imports, else build; 1: build; 0: never
#   GPU_CHECK_DEADLINE      seconds after the start by which every step has ended (default 570, under the device
#                           call's 600): each step's limit is cut to the time left, and a step with under 20 s left
#                           is skipped, so a slow start (a build) costs the last steps' time, not the whole call's rows
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} FUSEDRES_BUILD_CUDA=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
declare -A result
steps=()
deadline=$((SECONDS + ${GPU_CHECK_DEADLINE:-570}))
summary() {  # the summary table (last in the output), written after every step with everything packed into $OUT, so
  local run step  # a call stopped by its time limit still brings back what ran
  {
    for run in "${!bench_runs[@]}"; do  # whole tables: a convs table's verdicts come after its ~140 rows
      echo; cat "$out/bench$run/results.md" 2>/dev/null | head -250
      echo; cat "$out/bench$run/compare.md" 2>/dev/null | head -250
    done
    echo
    grep -E "(^| )(FAILED|ERROR)( |$)" "$out/tests.log" 2>/dev/null | cut -c1-300 | sort -u | head -40
    grep -E "^(====|E  )" "$out/failures.log" 2>/dev/null | cut -c1-200 | head -60  # each failure's test and E lines
    echo
    echo "== gpu_check summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)) =="
    for step in "${steps[@]}"; do printf '%-10s %s\n' "$step" "${result[$step]}"; done
    printf '%-10s %s\n' kernels "Triton kernels: $carried; $(($(kernels) - kernels_before)) compiled on this machine"
  } > "$out/summary.txt"
  if [ -n "${OUT:-}" ] && [ "$out" != "$OUT" ]; then  # replaced whole: a call stopped while packing keeps the last
    tar czf "$OUT/gpu_check.tgz.part" -C "$out" . && mv "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz" \
      && cp "$out/summary.txt" "$OUT/summary.txt"
  fi
}
note() { steps+=("$1"); result[$1]=$2; summary; }
# a step past its limit gets SIGINT (pytest and the benchmarks then stop as on Ctrl-C, printing what they have), and
# SIGKILL 15 s later; the limit asked for (0 or none: no limit of its own) is cut to the time left before the deadline
left() { echo $((deadline - SECONDS - 15)); }
limit() {
  local seconds=${1:-0}
  if [ "$seconds" = 0 ] || [ "$seconds" -gt "$(left)" ]; then seconds=$(left); fi
  echo "timeout -s INT -k 15 $((seconds > 1 ? seconds : 1))"
}
fits() {  # whether step $1 has 20 s left, else noted as skipped
  [ "$(left)" -ge 20 ] && return 0
  note "$1" "skipped: $(( deadline - SECONDS )) s left before the deadline (GPU_CHECK_DEADLINE)"
  return 1
}

models="--levels models --models resnet50 --backends auto --precompile --modes"  # fused: precompile, then timed
IFS=';' read -ra bench_runs <<< "${GPU_CHECK_BENCH:-100 --levels convs --models resnet50 --modes fwd; 100 $models infer --batch 256,1; 190 $models train}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

# Triton kernels: one cache folder, the carried kernels unpacked into it; what is compiled here lands there too
export TRITON_CACHE_DIR=/tmp/fusedres-triton-cache
mkdir -p "$TRITON_CACHE_DIR"
# fusedres's kernels (torch.compile's Inductor, whose kernels are named triton_*, shares the cache folder)
kernels() { find "$TRITON_CACHE_DIR" -name '__grp__*.json' ! -name '__grp__triton_*' | wc -l; }
if [ -f .device/triton-cache.tgz ]; then
  tar xzf .device/triton-cache.tgz -C "$(dirname "$TRITON_CACHE_DIR")"
  here=$("$py" -c "from triton.runtime.cache import triton_key; import hashlib; print(hashlib.sha256(triton_key().encode()).hexdigest())")
  same=$([ "$here" = "$(cat .device/triton-key 2>/dev/null)" ] && echo "same triton build" || echo "OTHER triton build: none will be found")
  carried="$(kernels) carried ($same)"
else
  carried="none carried (scripts/device_prep.sh)"
fi
kernels_before=$(kernels)

extension_sources() { cat setup.py csrc/* | sha256sum | cut -d' ' -f1; }  # as device_prep.sh writes it
start=$SECONDS
extension=$(ls fusedres/_C.cpython-"$("$py" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"-*.so 2>/dev/null)
build=${GPU_CHECK_BUILD:-auto}
# the carried build serves if device_prep.sh built it from these sources and fusedres takes it (a build for another
# torch release imports, then misreads tensors: fusedres._extension refuses it)
if [ "$build" = auto ] && [ -n "$extension" ] \
    && { [ "$(extension_sources)" = "$(cat .device/extension-sources 2>/dev/null)" ] \
         || { echo "built from other sources than these (.device/extension-sources)"; false; }; } \
       > "$out/carried_import.log" 2>&1 \
    && "$py" -c "import sys; sys.path.insert(0, '.'); from fusedres._extension import _import_built
module, why = _import_built(); print(why); sys.exit(module is None)" >> "$out/carried_import.log" 2>&1; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  note build "carried $extension (imports, built from these sources)"
elif [ "$build" = 0 ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  note build "skipped (GPU_CHECK_BUILD=0): ${extension:-no extension}"
else
  $(limit 0) "$py" -m pip install --no-build-isolation --no-deps -v -e . > "$out/build.log" 2>&1
  rc=$?
  why=$([ "$build" = auto ] && [ -n "$extension" ] && echo " (the carried $extension did not serve: carried_import.log)")
  note build "rc=$rc in $((SECONDS - start)) s$why"
fi
"$py" -m fusedres info 2>&1 | tee "$out/info.txt"

# -v: one line per finished test, so a run stopped by its timeout still says what passed and failed; each
# failure's traceback goes to failures.log as it happens (tests/conftest.py)
export FUSEDRES_FAILURES_LOG="$out/failures.log"
rm -f "$FUSEDRES_FAILURES_LOG"
start=$SECONDS
default_tests="tests/test_triton_conv.py tests/test_triton_conv_wgrad.py tests/test_triton_kernels.py
               tests/test_per_channel.py tests/test_dispatch.py tests/test_dispatch_checks.py tests/test_inference_ops.py tests/test_modules.py
               tests/test_precompile.py tests/test_graphs.py
               tests/test_convert.py::test_gpu_stem_unit_matches_eager"
# shellcheck disable=SC2086
$(limit "${GPU_CHECK_TESTS_TIMEOUT:-130}") "$py" -m pytest ${GPU_CHECK_TESTS:-$default_tests} -m "not host_emulation" \
  -k "${GPU_CHECK_TESTS_K:-}" -v -rfE ${GPU_CHECK_PYTEST_ARGS:--n 8 --timeout 120} --junitxml="$out/tests.xml" \
  > "$out/tests.log" 2>&1
rc=$?
note tests "rc=$rc in $((SECONDS - start)) s: $(tail -1 "$out/tests.log" | cut -c1-160) ($(grep -c ' PASSED' \
  "$out/tests.log") passed, $(grep -c ' FAILED' "$out/tests.log") failed lines)"

if [ "${GPU_CHECK_SWEEP:-0}" = 1 ] && fits sweep; then  # each conv config alone: err/bound per launch, usable or not
  $(limit 180) "$py" scripts/conv_config_sweep.py > "$out/sweep.log" 2>&1
  note sweep "rc=$? $(grep -c ' BAD' "$out/sweep.log") wrong, of which usable: $(grep -cE ' yes +BAD' "$out/sweep.log")"
fi

profiles=${GPU_CHECK_PROFILE:-0}
[ "$profiles" = 1 ] && profiles=infer
if [ "$profiles" != 0 ]; then  # does the GPU wait for the host? which kernels take the time?
  for entry in ${profiles//,/ }; do  # MODE or MODE@BATCH
    mode=${entry%@*} batch=256 name=$mode
    [ "$entry" != "$mode" ] && batch=${entry#*@} name=${mode}_b$batch
    fits "prof_$name" || continue
    $(limit 150) "$py" scripts/profile_model.py --mode "$mode" --batch "$batch" --out "$out/profile_$name" \
      > "$out/profile_$name.log" 2>&1
    note "prof_$name" "rc=$? $(grep -E '^(host|gpu) ms' "$out/profile_$name.log" | sed -E 's/ a .*: / /; s/ \(.*//' | tr '\n' ' ')(profile_$name/profile.txt)"
  done
fi

if [ "${GPU_CHECK_SANITIZER:-0}" = 1 ]; then
  for tool in memcheck racecheck; do
    fits "$tool" || continue
    $(limit "${GPU_CHECK_SANITIZER_TIMEOUT:-120}") compute-sanitizer --tool "$tool" --error-exitcode 99 "$py" -m pytest \
      tests/test_cuda_backend.py -q -x -m "not host_emulation" -k "not large" > "$out/sanitizer_$tool.log" 2>&1
    note "$tool" "rc=$? $(grep -E 'ERROR SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
  done
fi

if [ "${GPU_CHECK_HOST:-0}" = 1 ] && fits host; then  # host time per Triton conv call, real kernels and stubbed ones
  $(limit 90) "$py" -m benchmarks.host_overhead > "$out/host_overhead.txt" 2>&1
  note host "rc=$? $(tail -1 "$out/host_overhead.txt" | tr -s ' ')"
fi

if [ "${GPU_CHECK_NCU:-0}" = 1 ] && fits ncu; then  # hardware counters of cuDNN's and the Triton conv's kernels
  # the report is kept (ncu_convs.ncu-rep) and printed twice: the sections' details, and every metric collected
  # (raw: the warp-state section's stall reasons, per kernel, which the details page leaves out)
  $(limit "${GPU_CHECK_NCU_TIMEOUT:-90}") ncu --profile-from-start off --clock-control none --nvtx --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
    --export "$out/ncu_convs" --force-overwrite "$py" scripts/ncu_convs.py > "$out/ncu_convs.log" 2>&1
  rc=$?
  for page in details raw; do
    ncu --import "$out/ncu_convs.ncu-rep" --csv --page $page > "$out/ncu_convs_$page.csv" 2>> "$out/ncu_convs.log"
  done
  note ncu "rc=$rc ($out/ncu_convs_details.csv, $out/ncu_convs_raw.csv)"
fi

# TRITON_PRINT_AUTOTUNING=1: each log names the config each new autotuning key chose (USE_TMA: which kind)
for i in "${!bench_runs[@]}"; do
  read -ra run_args <<< "${bench_runs[$i]}"
  [ "${#run_args[@]}" -gt 0 ] || continue
  fits "bench$i" || continue
  start=$SECONDS
  TRITON_PRINT_AUTOTUNING=1 $(limit "${run_args[0]}") "$py" -m benchmarks "${run_args[@]:1}" --out "$out/bench$i" \
    > "$out/bench$i.log" 2>&1
  note "bench$i" "rc=$? in $((SECONDS - start)) s: ${run_args[*]:1} (table: bench$i/results.md, rows: bench$i.log)"
  for baseline in benchmarks/baselines/*.json; do  # a kept run of the same command: what changed since
    [ -f "$out/bench$i/results.json" ] || break
    ran=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['command'].split(' --out')[0])" "$baseline")
    if [ "$ran" = "python -m benchmarks ${run_args[*]:1}" ]; then
      "$py" -m benchmarks.compare "$baseline" "$out/bench$i/results.json" > "$out/bench$i/compare.md" 2>&1
      note "cmp$i" "rc=$? bench$i/compare.md: against $(basename "$baseline")"
    fi
  done
done
cat "$out/summary.txt"
