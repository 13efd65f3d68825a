"""The process settings every entry point applies before torch is imported.

* `OMP_WAIT_POLICY=PASSIVE`: idle OpenMP threads sleep instead of spinning. On a shared CPU,
  spinning threads made the proposal matmuls and the CPU VQA path several times slower
  (benchmarks/README.md). The OpenMP runtime reads it once, when torch loads it: setting it later
  has no effect.
* `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`: cached vision features (long-lived)
  interleave with the vision tower's transient activations; expandable segments keep the CUDA
  allocator from stranding memory in half-used blocks. Read when CUDA initialises.

A value the user already set wins. The entry points -- the DVC stage scripts, the seed command
(`python -m lever_lm.models.v3.generate_rl_data`), `python -m lever_lm.rl.cli`, the Ray workers
and the benchmarks -- call `apply_process_settings()` first thing; this module imports nothing
heavy, so calling it cannot import torch early.
"""

from __future__ import annotations

import os

PROCESS_SETTINGS = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
}


def apply_process_settings() -> None:
    """Set each process setting the environment does not set yet (idempotent)."""
    for name, value in PROCESS_SETTINGS.items():
        os.environ.setdefault(name, value)
