"""DVC stage: the demo's trained tiny CLIP (see lever_lm.demo.train_clip)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.demo.train_clip import main  # noqa: E402

if __name__ == "__main__":
    main()
