"""DVC stage: validate the RL data and write metrics and plots (see lever_lm.rl.validate)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.rl.validate import main  # noqa: E402

if __name__ == "__main__":
    main()
