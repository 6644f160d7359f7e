#!/usr/bin/env bash
# Before a GPU check, on this CPU machine: build what the GPU machine would otherwise spend its minutes on.
#   scripts/device_prep.sh            then, with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".device", "fusedres/_C.cpython-312-x86_64-linux-gnu.so"])
#
# 1. A venv with the GPU image's stack (python 3.12, torch 2.11.0 cu130, triton 3.6.0, torchvision 0.26.0; from
#    PyPI) at $FUSEDRES_DEVICE_VENV (default /tmp/fusedres-py312); set FUSEDRES_DEVICE_PYTHON to a python3.12
#    where pyenv has none.
# 2. The CUDA extension built against it for sm_90: fusedres/_C.cpython-312-x86_64-linux-gnu.so (~97 s of the
#    GPU machine's time when built there). gpu_check.sh uses it where fusedres takes it and it was built from the
#    same setup.py and csrc/ (.device/extension-sources), else builds.
# 3. The Triton kernels of the GPU check's ResNet-50 runs (scripts/resnet50_compiles.py: training and the
#    convs level at batch 256, inference at 1, 32, 256), compiled for sm_90 into the Triton cache
#    /tmp/fusedres-triton-cache and packed as .device/triton-cache.tgz; .device/triton-key says which triton
#    built them. gpu_check.sh unpacks it at the same path (the cache's records name their files by it) and
#    reports how many kernels it still compiled. Both compiles print ptxas's audit of the kernels (spills,
#    serialised wgmma; every record in .device/ptxas-*.json).
# About 7.5 minutes on 2 cores (759 kernels in ~6 min, the extension ~1.5 min); each step is skipped when its output is newer than
# its sources. Any edit of fusedres/triton redoes the kernels: triton's cache key includes each kernel's first line
# number, so even a docstring line added above a kernel makes every compile of it a new one.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FUSEDRES_DEVICE_VENV:-/tmp/fusedres-py312}
cache=/tmp/fusedres-triton-cache
mkdir -p .device

if [ ! -x "$venv/bin/python" ]; then
  # (no match: empty, not an exit of set -e before the message below)
  python=${FUSEDRES_DEVICE_PYTHON:-$( { ls -d "$HOME"/.pyenv/versions/3.12.*/bin/python3 2>/dev/null || true; } | tail -1)}
  [ -n "$python" ] || { echo "device_prep.sh: no python3.12 found; set FUSEDRES_DEVICE_PYTHON" >&2; exit 1; }
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 numpy ninja pybind11 setuptools wheel
  "$venv/bin/python" -m pip install -q --no-deps torchvision==0.26.0 pillow
fi
py=$venv/bin/python
"$py" -c "import torch, triton; print('device_prep.sh: torch', torch.__version__, 'triton', triton.__version__)"

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)}
extension=fusedres/_C.cpython-312-x86_64-linux-gnu.so
sources=$(cat setup.py csrc/* | sha256sum | cut -d' ' -f1)  # what gpu_check.sh compares
if [ ! -f "$extension" ] || [ "$sources" != "$(cat .device/extension-sources 2>/dev/null)" ]; then
  start=$SECONDS
  rm -f .device/extension-sources
  FUSEDRES_BUILD_CUDA=1 "$py" setup.py -q build_ext --inplace > .device/build.log 2>&1 \
    || { tail -30 .device/build.log; echo "device_prep.sh: extension build failed"; exit 1; }
  echo "$sources" > .device/extension-sources
  echo "device_prep.sh: $extension built in $((SECONDS - start)) s"
fi

packed=.device/triton-cache.tgz
if [ ! -f "$packed" ] || [ -n "$(find fusedres/triton scripts/resnet50_compiles.py tests/triton_conv_helpers.py \
                                      -newer "$packed" -print -quit)" ]; then
  start=$SECONDS
  rm -rf "$cache"
  "$py" scripts/resnet50_compiles.py --cache "$cache" --ahead --report .device/ptxas-train-convs.json \
    --mode train,convs --batch 256
  "$py" scripts/resnet50_compiles.py --cache "$cache" --ahead --report .device/ptxas-infer.json --mode infer --batch 1,32,256
  find "$cache" -name '*.source' -delete  # the kernels' TTIR: a cache hit loads the metadata and the binary only
  tar czf "$packed" -C "$(dirname "$cache")" "$(basename "$cache")"
  "$py" -c "from triton.runtime.cache import triton_key; import hashlib; print(hashlib.sha256(triton_key().encode()).hexdigest())" \
    > .device/triton-key
  echo "device_prep.sh: $packed ($(du -h "$packed" | cut -f1)) in $((SECONDS - start)) s"
fi
echo "device_prep.sh: carry .device and $extension"
