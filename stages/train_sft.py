"""DVC stage: the demo's SFT pointer checkpoint from its beam data (see lever_lm.models.v2.train_sft)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.models.v2.train_sft import main  # noqa: E402

if __name__ == "__main__":
    main()
