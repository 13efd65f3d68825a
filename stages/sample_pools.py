"""DVC stage: the beam queries and their pools, the lineage's sampler cache (see lever_lm.models.v3.samplers)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.models.v3.samplers import main  # noqa: E402

if __name__ == "__main__":
    main()
