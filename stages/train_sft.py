"""DVC stage: the demo's SFT pointer checkpoint from its beam data (see lever_lm.models.v2.train_sft)."""

from lever_lm.models.v2.train_sft import main

if __name__ == "__main__":
    main()
