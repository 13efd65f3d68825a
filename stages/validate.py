"""DVC stage: validate the RL data and write metrics and plots (see lever_lm.rl.validate)."""

from lever_lm.rl.validate import main

if __name__ == "__main__":
    main()
