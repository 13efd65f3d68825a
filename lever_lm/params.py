"""params.yaml -> command-line flags, for the DVC stages that take their settings from it.

Every key of `params` that names a flag of the parser becomes that flag (a list becomes several
values; a switch is given when the key has the value it sets -- `gt_prob: false` gives
`--no_gt_prob`; an empty string or null is left out, so the parser's default holds).
"""

from __future__ import annotations

import argparse


def flags_from_params(params: dict, parser: argparse.ArgumentParser) -> list[str]:
    argv = []
    for action in parser._actions:
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
