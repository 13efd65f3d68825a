"""DVC stage: RL data generation with the settings of params.yaml (see lever_lm.rl.cli).

Every top-level key of params.yaml that names a flag of the generator's parser becomes that
flag (`lever_lm.params.flags_from_params`). Extra command-line arguments are passed through
(e.g. --limit 8).
"""

import argparse
import sys

import yaml

from lever_lm.params import flags_from_params
from lever_lm.rl.cli import build_parser, main


def argv_from_params(params: dict, parser: argparse.ArgumentParser | None = None) -> list[str]:
    return flags_from_params(params, parser or build_parser())


if __name__ == "__main__":
    with open("params.yaml", encoding="utf-8") as handle:
        main(argv_from_params(yaml.safe_load(handle)) + sys.argv[1:])
