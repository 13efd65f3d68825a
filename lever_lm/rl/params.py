"""The generator's settings in params.yaml: one surface, every key of it tracked by DVC.

Every option of the generator's parser (`lever_lm.rl.cli.build_parser`) is a top-level key of
params.yaml under its own name, and the DVC stage `generate_rl_data` lists every one of them as a
param, so whatever params.yaml can set for the generator, `dvc status` sees, and
`dvc exp run -S 'temps=[0.7,1.0,1.3]'` works with top-level keys as written. A test holds the
stage's list against the parser, so a new flag cannot go untracked. DVC refuses a run when a
listed key is missing from params.yaml, so params.yaml holds each key; `null` there means "the
generator's default", which is stated once, in the code.

Why a list and not `params.yaml` tracked whole: the file also holds the other stages' settings
(the demo's, the embedding export's, the validation's), and a change to one of those must not
rerun the generation.

`argv_from_params` turns the keys into flags, checking each value's type on the way -- a wrong
type is an `InputError` naming the key and the type it needs, never an argparse usage dump and
never silently ignored. The stage also refuses a generator key that dvc.yaml's stage does not
track (an edited dvc.yaml), the layout keys a single DVC run cannot use (shards, merge), a
top-level key that no stage of dvc.yaml reads (a misspelt key would otherwise change nothing, in
silence) and a key written twice (YAML keeps the last one, in silence).

The beam data stage (`stages/beam_data.py`) takes its shared settings -- the training split, the
VQA model, device, batch size, engine -- from the same top-level keys, through the same checks:
`stage_argv(..., stage="beam_data", keys=lever_lm.infoscore.cli.SHARED_PARAMS)`, every one of
them tracked by its stage in dvc.yaml.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from lever_lm.errors import InputError

STAGE = "generate_rl_data"
SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction)
# Options for running one shard of a job by hand: a DVC stage is one whole run that writes the output.
SINGLE_RUN = {"num_shards": 1, "shard_id": 0, "merge": False}
COMMANDS = {
    STAGE: "generator",
    "beam_data": "beam data command",
    "evaluate": "evaluation",
}  # what each stage runs, for messages


def generator_keys(parser: argparse.ArgumentParser) -> list[str]:
    """Every option's key (its dest), in the parser's order: the keys params.yaml may set."""
    keys = []
    for action in parser._actions:
        if action.option_strings and action.dest != "help" and action.dest not in keys:
            keys.append(action.dest)
    return keys


def argv_from_params(params: dict, parser: argparse.ArgumentParser, source: str = "params.yaml") -> list[str]:
    """The generator's flags for the keys of `params` that name its options (other keys are other stages')."""
    argv: list[str] = []
    for key in generator_keys(parser):
        value = params.get(key)
        if value is None:
            continue
        actions = [a for a in parser._actions if a.dest == key]
        argv += _flags(key, value, actions, source)
    return argv


def _flags(key: str, value: object, actions: list[argparse.Action], source: str) -> list[str]:
    action = actions[0]
    if isinstance(action, SWITCHES):
        if not isinstance(value, bool):
            raise _wrong(source, key, "true or false", value)
        chosen = next((a for a in actions if a.const is value), None)
        return [] if value == action.default or chosen is None else [chosen.option_strings[0]]
    flag = action.option_strings[0]
    if action.nargs == "*":
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            raise _wrong(source, key, "a list of numbers, e.g. [0.7, 1.0]", value)
        return [flag, *map(str, value)]
    if action.type is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _wrong(source, key, "an integer", value)
    elif action.type is float:
        if not _is_number(value):
            raise _wrong(source, key, "a number", value)
    elif action.choices is not None:
        if value not in action.choices:
            raise _wrong(source, key, f"one of {', '.join(map(str, action.choices))}", value)
    elif not isinstance(value, str) or not value.strip():
        raise _wrong(source, key, "a non-empty string (or null for the default)", value)
    return [f"{flag}={value}"]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _wrong(source: str, key: str, expected: str, value: object) -> InputError:
    return InputError(source, f"{key} must be {expected}, got {value!r} ({type(value).__name__})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping, as DVC does."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_params(params_path: Path) -> dict:
    """params.yaml as a mapping; unreadable YAML or a duplicate key is an `InputError`."""
    try:
        params = yaml.load(params_path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, yaml.YAMLError) as error:
        raise InputError(params_path, f"cannot read it: {' '.join(str(error).split())}") from None
    if not isinstance(params, dict):
        raise InputError(params_path, "expected a mapping of settings")
    return params


def keys_read_by_stages(dvc_yaml: Path) -> set[str]:
    """The top-level params.yaml keys that some stage of dvc.yaml lists as a param or interpolates."""
    try:
        text = dvc_yaml.read_text(encoding="utf-8")
        stages = yaml.safe_load(text)["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise InputError(dvc_yaml, "cannot read its stages") from None
    keys = {key.split(".")[0] for stage in stages.values() for key in _listed_params(stage)}
    return keys | set(re.findall(r"\$\{\s*([A-Za-z_]\w*)", text))


def tracked_params(dvc_yaml: Path, stage: str = STAGE) -> set[str]:
    """The params.yaml keys that dvc.yaml's stage lists."""
    try:
        definition = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"][stage]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        raise InputError(dvc_yaml, f"cannot read the params of stage {stage}") from None
    if not isinstance(definition, dict):
        raise InputError(dvc_yaml, f"cannot read the params of stage {stage}")
    return _listed_params(definition)


def _listed_params(stage: dict) -> set[str]:
    """The params.yaml keys one stage's definition lists (plain names, or under a `params.yaml:` entry)."""
    keys: set[str] = set()
    for entry in stage.get("params", []) if isinstance(stage, dict) else []:
        if isinstance(entry, str):
            keys.add(entry)
        elif isinstance(entry, dict) and "params.yaml" in entry:
            keys.update(entry["params.yaml"] or [])
    return keys


def stage_argv(
    params_path: Path,
    dvc_yaml: Path,
    parser: argparse.ArgumentParser,
    stage: str = STAGE,
    keys: Iterable[str] | None = None,
) -> list[str]:
    """The flags of the DVC stage `stage`'s command (`parser`) from params.yaml, every key checked (see
    the module doc). `keys`: the top-level keys the stage takes (None: every option of the parser)."""
    everything = read_params(params_path)
    params = everything if keys is None else {key: everything[key] for key in keys if key in everything}
    check_tracked(params, tracked_params(dvc_yaml, stage), parser, params_path.name, stage)
    read = keys_read_by_stages(dvc_yaml)
    unread = [key for key in everything if key not in read]
    if unread:
        raise InputError(
            params_path.name,
            f"{', '.join(unread)}: no stage of {dvc_yaml.name} reads this key (misspelt?); "
            "the generator's keys are its options' names (--help)",
        )
    for key, default in SINGLE_RUN.items():
        if params.get(key) not in (None, default):
            raise InputError(
                params_path.name,
                f"{key}: the DVC stage is one whole run; run shards with the generator command "
                "(docs/generator.md, 'Shards')",
            )
    return argv_from_params(params, parser, params_path.name)


def check_tracked(
    params: dict, tracked: Iterable[str], parser: argparse.ArgumentParser, source: str, stage: str = STAGE
) -> None:
    """A key of the stage's command that DVC does not track would change the data without DVC noticing."""
    untracked = [k for k in generator_keys(parser) if k in params and k not in set(tracked)]
    if untracked:
        raise InputError(
            source,
            f"{', '.join(untracked)} set the {COMMANDS.get(stage, stage)}, but dvc.yaml's stage {stage} does not "
            "track them: add them to its params",
        )
