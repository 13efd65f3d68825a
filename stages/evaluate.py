"""DVC stage: the evaluation of the pointer on the validation split (see lever_lm.evaluation.cli)."""

from lever_lm.evaluation.cli import main

if __name__ == "__main__":
    main()
