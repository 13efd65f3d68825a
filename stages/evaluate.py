"""DVC stage: the evaluation of a pointer on the validation split (see lever_lm.evaluation.cli).

The command line in dvc.yaml gives the `evaluate` section and the output directory; the settings
the evaluation shares with the RL generator -- the training split (the ICD pool) and its
embeddings, the VQA model and its config, device, batch size, eval mode
(`lever_lm.evaluation.cli.SHARED_PARAMS`) -- come from params.yaml's top level, each value's type
checked and each key tracked by the stage in dvc.yaml (`lever_lm.rl.params.stage_argv`; null: the
default).
"""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from lever_lm.errors import exit_on_input_error  # noqa: E402
from lever_lm.evaluation.cli import SHARED_PARAMS, STAGE, build_parser, main  # noqa: E402
from lever_lm.rl.params import stage_argv  # noqa: E402

if __name__ == "__main__":
    with exit_on_input_error():
        argv = stage_argv(Path("params.yaml"), Path("dvc.yaml"), build_parser(), stage=STAGE, keys=SHARED_PARAMS)
    main(argv + sys.argv[1:])
