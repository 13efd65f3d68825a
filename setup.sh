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
# Whether torch sees a GPU; asking for a CUDA build (TORCH_INDEX) and getting none is an error.
if ! .venv/bin/python -c 'import torch; print("torch CUDA build:", torch.version.cuda, "| CUDA available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0), "| native bf16:", torch.cuda.is_bf16_supported(including_emulation=False))
raise SystemExit(0 if torch.cuda.is_available() else 3)'; then
    if [ -n "${TORCH_INDEX:-}" ]; then
        echo "error: TORCH_INDEX was given but torch sees no CUDA device (check the driver with nvidia-smi and pick the index that matches it)" >&2
        exit 1
    fi
fi
