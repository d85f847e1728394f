#!/usr/bin/env bash
# Compile and link the CUDA extension (csrc/cuda) for sm_80 and sm_90 against the CUDA build of
# torch 2.14.1 in its own venv (.venv-cuda), then load it and check that its kernels are
# registered. Fails on any compiler or linker error. Nothing runs on a GPU (none is available).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda_build: nvcc not on PATH" >&2; exit 1; }
# The toolkit root (headers, lib64/libcudart) as nvcc itself reports it: `nvcc` on PATH may be a
# wrapper script outside the toolkit.
top=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
export CUDA_HOME=${CUDA_HOME:-$(cd "$top" && pwd)}
start=$SECONDS
if ! .venv-cuda/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  python3 -m venv .venv-cuda
  # torch 2.14.1+cu130 lies on the machines' disk (about 5.5 GB installed).
  .venv-cuda/bin/pip install -q torch==2.14.1 numpy setuptools ninja 2>&1 \
    | grep -v "^WARNING: Location" || true
fi
echo "check_cuda_build: venv ready after $((SECONDS - start)) s"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
MAX_JOBS=${MAX_JOBS:-2} .venv-cuda/bin/python setup.py -q build_ext \
  --build-temp "$build/temp" --build-lib "$build/lib"
# Loading resolves every symbol the link left open (cudart, c10_cuda, torch_cuda).
(cd "$build/lib" && "$OLDPWD/.venv-cuda/bin/python" - <<'PY'
import torch

import vllm_ptp._C  # noqa: F401  (defines the op schemas)
import vllm_ptp._C_cuda  # noqa: F401

for op in ["uniforms", "write_u_embeddings", "sample", "sample_and_verify", "paged_slots"]:
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vllm_ptp::{op}", "CUDA"), op
print("check_cuda_build: CUDA ops registered for", torch.__version__, "(sm_80, sm_90)")
PY
)
echo "check_cuda_build: ok in $((SECONDS - start)) s"
