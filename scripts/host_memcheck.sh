#!/usr/bin/env bash
# The CPU stand-in for compute-sanitizer's memcheck: the CUDA kernels' host emulation built with
# AddressSanitizer (tests/host_emulation.py), run over tests/test_cuda_backend.py's host cases.
# An out-of-bounds access by a kernel stops the run; ASan's report lands in build/host_memcheck/.
# Usage: scripts/host_memcheck.sh [pytest args...]      e.g. scripts/host_memcheck.sh -k float16
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
logs=build/host_memcheck
mkdir -p "$logs"
rm -f "$logs"/asan.log.*
export FUSEDRES_EMULATION_SANITIZE=address ASAN_OPTIONS=detect_leaks=0:log_path=$logs/asan.log
# ASan first; libstdc++ with it, or ASan's __cxa_throw interceptor fails at the first C++ exception
LD_PRELOAD="$("${CXX:-c++}" -print-file-name=libasan.so) $("${CXX:-c++}" -print-file-name=libstdc++.so)"
export LD_PRELOAD
set +e
PYTHONPATH=. "$py" -m pytest tests/test_cuda_backend.py -m host_emulation -q -p no:logging "$@"
status=$?
set -e
reports=$(grep -l "ERROR: AddressSanitizer" "$logs"/asan.log.* 2>/dev/null || true)
if [ -n "$reports" ]; then
  for report in $reports; do sed -n 1,25p "$report"; done
  echo "host_memcheck: AddressSanitizer errors (full reports: $reports)"
  exit 1
fi
echo "host_memcheck: no AddressSanitizer error; pytest exit $status"
exit "$status"
