#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Works on CPU-only and GPU machines.
# TORCH_SPEC overrides the torch/torchvision pair (default: a pair verified here; torchvision must load,
# the LLaVA-OneVision processor cannot be built without it).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q ${TORCH_SPEC:-"torch==2.14.1" "torchvision==0.29.2"}
pip install -q -e ".[test]"
python -c "import torchvision.transforms.v2, transformers, lmms_eval_redundancy; print('lmms-eval-redundancy installed:', transformers.__version__)"
