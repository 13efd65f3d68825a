#!/usr/bin/env bash
# The GPU check in one go (about 6-9 minutes on an H100/H200): see benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU and a CUDA torch
#
# The project pins transformers 5.24.*. On a machine whose Python has another version, put the
# wheel in .whl/ first (on a machine with network access, from the repo root):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl transformers==5.24.0
# and the script installs it into /tmp/site for this run (nothing else is installed).
# Results: $OUT/gpu_check.json (one entry per step, written as each ends), $OUT/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
$PY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "bf16", torch.cuda.is_bf16_supported(including_emulation=False))' | tee "$OUT/versions.txt"
# Order: the cheapest decisive figures first, so that a time-out keeps them.
for step in drill bench prepare generate resume; do
    timeout "${STEP_TIMEOUT:-300}" $PY benchmarks/gpu_check.py "$step" --work /tmp/gpu_check --out "$OUT" 2>&1 | tee -a "$OUT/gpu_check.log"
done
cat "$OUT/gpu_check.json"
