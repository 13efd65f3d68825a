"""DVC stage: InfoScore beam data (see lever_lm.infoscore.cli).

The command line in dvc.yaml gives the stage's own files and the `infoscore` section; the
settings it shares with the RL generator -- the training split, the VQA model and its config,
device, batch size and engine (`lever_lm.infoscore.cli.SHARED_PARAMS`) -- come from params.yaml's
top level, each value's type checked and each key tracked by the stage in dvc.yaml
(`lever_lm.rl.params.stage_argv`; null: the default). Extra command-line arguments are passed
through (e.g. --limit 8).
"""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from lever_lm.errors import exit_on_input_error  # noqa: E402
from lever_lm.infoscore.cli import SHARED_PARAMS, STAGE, build_parser, main  # noqa: E402
from lever_lm.rl.params import stage_argv  # noqa: E402

if __name__ == "__main__":
    with exit_on_input_error():
        argv = stage_argv(Path("params.yaml"), Path("dvc.yaml"), build_parser(), stage=STAGE, keys=SHARED_PARAMS)
    main(argv + sys.argv[1:])
