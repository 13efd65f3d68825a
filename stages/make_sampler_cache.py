"""DVC stage: the demo's sampler cache, per-query pools in the lineage's format (see lever_lm.models.v3.pools)."""

from lever_lm.models.v3.pools import main

if __name__ == "__main__":
    main()
