"""The seed's command path: `python -m lever_lm.models.v3.generate_rl_data` (docs/formats.md §2).

The command line lives in `lever_lm.rl.cli` and the work in `lever_lm.rl.generate`; this module
only keeps the seed's module path working.
"""

from __future__ import annotations

import os

# Threads that sleep when idle instead of spinning: on a shared CPU, spinning OpenMP threads make
# the proposal matmuls several times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Cached vision features (long-lived) interleave with the tower's transient activations; expandable
# segments keep the CUDA allocator from stranding memory in half-used blocks. Read when CUDA initialises.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from lever_lm.rl.cli import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
