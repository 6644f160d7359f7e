#!/usr/bin/env bash
# Set up a fresh machine and run fusedres:  ./scripts/dev.sh demo | test [pytest args...]
#
# Creates .venv (FUSEDRES_VENV overrides) with requirements-dev.txt, installs fusedres editable,
# building the CUDA extension when nvcc is found (CUDA_HOME, default /usr/local/cuda), then runs
# the demo (python -m fusedres demo) or the test suite (pytest tests [pytest args], then the benchmark
# suite's quick subset as a smoke test: every contender checked against eager, no timing asserted).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FUSEDRES_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python

deps_stamp=$venv/.fusedres-deps
if [ ! -f "$deps_stamp" ] || [ requirements-dev.txt -nt "$deps_stamp" ]; then
  echo "dev.sh: installing requirements-dev.txt into $venv"
  "$py" -m pip install -q -r requirements-dev.txt
  touch "$deps_stamp"
fi

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export FUSEDRES_BUILD_CUDA=${FUSEDRES_BUILD_CUDA:-1}
else
  echo "dev.sh: nvcc not found under CUDA_HOME=$CUDA_HOME: installing without the CUDA extension"
  export FUSEDRES_BUILD_CUDA=0
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
install_stamp=$venv/.fusedres-install
if [ ! -f "$install_stamp" ] || [ -n "$(find setup.py pyproject.toml csrc -newer "$install_stamp" -print -quit)" ]; then
  echo "dev.sh: installing fusedres (editable; FUSEDRES_BUILD_CUDA=$FUSEDRES_BUILD_CUDA)"
  start=$SECONDS
  "$py" -m pip install --no-build-isolation --no-deps -e . 2>&1 | grep -E "fusedres setup|error|Error|warning" || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "dev.sh: install failed"; exit 1; }
  echo "dev.sh: installed in $((SECONDS - start)) s"
  touch "$install_stamp"
fi

command=${1:-test}
shift || true
case "$command" in
  # pytest args go to the unit tests. The benchmark smoke runs after them in a process of its own:
  # tests/conftest.py sets TRITON_INTERPRET=1 on CPU, which would run its Triton contenders interpreted.
  test) "$py" -m pytest tests "$@" && exec "$py" -m pytest benchmarks -q ;;
  demo) exec "$py" -m fusedres demo "$@" ;;
  *) echo "usage: $0 demo|test [args...]" >&2; exit 2 ;;
esac
