"""DVC stage: RL data generation with the settings of params.yaml (see lever_lm.rl.params and lever_lm.rl.cli).

Every top-level key of params.yaml that names an option of the generator becomes that option
(`null`: the generator's default); each value's type is checked, and dvc.yaml must track every
such key. Extra command-line arguments are passed through (e.g. --limit 8).
"""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from lever_lm.errors import exit_on_input_error  # noqa: E402
from lever_lm.rl.cli import build_parser, main  # noqa: E402
from lever_lm.rl.params import stage_argv  # noqa: E402

if __name__ == "__main__":
    with exit_on_input_error():
        argv = stage_argv(Path("params.yaml"), Path("dvc.yaml"), build_parser())
    main(argv + sys.argv[1:])
