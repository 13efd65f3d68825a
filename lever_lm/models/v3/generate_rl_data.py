"""The seed's command path: `python -m lever_lm.models.v3.generate_rl_data` (docs/formats.md §2).

The command line lives in `lever_lm.rl.cli` and the work in `lever_lm.rl.generate`; this module
only keeps the seed's module path working.
"""

from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.rl.cli import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()
