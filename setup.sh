#!/usr/bin/env bash
# Create .venv in the repo root and install the project with its test tools.
# Idempotent: a second run only checks that everything is installed.
#
#   TORCH_SPEC   which torch to install first (default: torch==2.13.0, the CPU build here)
#   TORCH_INDEX  an extra index URL for torch, e.g. https://download.pytorch.org/whl/cu124
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
if [ -n "${TORCH_INDEX:-}" ]; then
    pip_install "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX"
else
    pip_install "$TORCH_SPEC"
fi
pip_install -e '.[test,ray]'
# Never torchvision: it does not import beside this torch and breaks transformers' imports.
if .venv/bin/python -m pip show torchvision >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -y -q torchvision
fi
echo "setup done: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
