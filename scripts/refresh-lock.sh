#!/usr/bin/env bash
# Refresh requirements.lock: install the newest versions the package's requirements allow into a scratch
# environment (.venv-refresh), run the full test suite there, and only if it passes write its versions to
# requirements.lock. Then reinstall with scripts/setup.sh and commit the lock with the suite's result.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .venv-refresh
python3 -m venv .venv-refresh
. .venv-refresh/bin/activate
pip install -q ${TORCH_SPEC:-torch torchvision}
pip install -q -e ".[test]"
python -m pytest -q
{
    sed -n '/^#/p' requirements.lock
    pip freeze --exclude-editable | grep -viE '^(lmms-eval-redundancy|-e )'
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "requirements.lock refreshed; the suite passed with it. Reinstall: bash scripts/setup.sh"
