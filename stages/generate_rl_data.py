"""DVC stage: RL data generation with the settings of params.yaml (see lever_lm.rl.cli).

Every top-level key of params.yaml that names a flag of the generator's parser becomes that
flag (a list becomes several values; a switch is given when the key has the value it sets --
`gt_prob: false` gives `--no_gt_prob`; an empty string or null is left out). Extra
command-line arguments are passed through (e.g. --limit 8).
"""

import argparse
import sys

import yaml

from lever_lm.rl.cli import build_parser, main


def argv_from_params(params: dict, parser: argparse.ArgumentParser | None = None) -> list[str]:
    argv = []
    for action in (parser or build_parser())._actions:
        if not action.option_strings or action.dest not in params:
            continue
        value, flag = params[action.dest], action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if value is action.const and value is not action.default:
                argv.append(flag)
            continue
        if value is None or value == "" or value is False:
            continue
        argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv


if __name__ == "__main__":
    with open("params.yaml", encoding="utf-8") as handle:
        main(argv_from_params(yaml.safe_load(handle)) + sys.argv[1:])
