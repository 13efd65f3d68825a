"""DVC stage: the demo's trained tiny Qwen2.5-VL (see lever_lm.demo.train_vlm)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.demo.train_vlm import main  # noqa: E402

if __name__ == "__main__":
    main()
