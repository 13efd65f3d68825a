"""DVC stage: the demo's sampler cache, per-query pools in the lineage's format (see lever_lm.models.v3.pools)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.models.v3.pools import main  # noqa: E402

if __name__ == "__main__":
    main()
