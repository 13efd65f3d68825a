"""DVC stage: the beam queries and their pools, the lineage's sampler cache (see lever_lm.models.v3.samplers)."""

from lever_lm.models.v3.samplers import main

if __name__ == "__main__":
    main()
