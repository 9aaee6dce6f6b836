#!/usr/bin/env bash
# Create .venv and install the project with its test extras at the versions in requirements.lock (the ones
# the suite passed with), whatever pip would pick today. Works on CPU-only and GPU machines.
# TORCH_SPEC overrides the torch/torchvision pair (e.g. a CUDA build for your driver); the lock's torch
# stack (torch, torchvision, triton, CUDA wheels) is then left out of the constraints and everything else
# stays locked. torchvision must load: the LLaVA-OneVision processor cannot be built without it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
constraints=requirements.lock
if [ -n "${TORCH_SPEC:-}" ]; then
    constraints=.venv/constraints-without-torch.txt
    grep -viE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' requirements.lock > "$constraints"
    pip install -q -c "$constraints" $TORCH_SPEC
else
    pip install -q -c "$constraints" torch torchvision
fi
pip install -q -c "$constraints" -e ".[test]"
python -c "import torchvision.transforms.v2, transformers, lmms_eval_redundancy; print('lmms-eval-redundancy installed:', transformers.__version__)"
