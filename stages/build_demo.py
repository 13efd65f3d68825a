"""DVC stage: build the embedded default (demo VQA data set + tiny models) under data/demo."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.demo.build import main  # noqa: E402

if __name__ == "__main__":
    main()
