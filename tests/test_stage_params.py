"""The generator's settings have one surface, params.yaml, and DVC tracks every key of it; so do the
beam data stage's and the evaluation's.

The keys are enumerated from the generator's (and the beam data command's) parser, never listed here. The DVC checks run in one
temporary git + DVC repo holding the project's files, with small placeholder inputs: `dvc status`
and `dvc exp run` need the stage's definition and lock, not real data (the stage itself stops on
the placeholders, which is enough to see that DVC ran it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from dvc_commands import dvc, run

from lever_lm.errors import InputError
from lever_lm.evaluation import cli as eval_cli
from lever_lm.infoscore import cli as beam_cli
from lever_lm.rl.cli import build_parser
from lever_lm.rl.params import COMMANDS, SWITCHES, argv_from_params, generator_keys, stage_argv, tracked_params

ROOT = Path(__file__).resolve().parents[1]
PARSER = build_parser()
KEYS = generator_keys(PARSER)
# Where the placeholder inputs go (a file, or a directory with one file).
PLACEHOLDERS = {
    "sft_ckpt": "inputs/sft.ckpt",
    "beam_data": "inputs/beam.json",
    "query_emb": "inputs/emb.pt",
    "cand_emb": "inputs/emb.pt",
    "train_ques_path": "inputs/questions.json",
    "train_ann_path": "inputs/annotations.json",
    "train_image_root": "inputs/images/",
    "val_ques_path": "inputs/questions.json",
    "val_ann_path": "inputs/annotations.json",
    "vqa_model_path": "inputs/model/",
    "sampler_cache": "inputs/cache.json",
}
EVALUATE_PLACEHOLDERS = {  # the evaluate section's files
    "ckpt": "inputs/sft.ckpt",
    "val_query_emb": "inputs/emb.pt",
    "val_ques_path": "inputs/questions.json",
    "val_ann_path": "inputs/annotations.json",
    "val_image_root": "inputs/images/",
}
BEAM_PARSER = beam_cli.build_parser()
BEAM_SECTION = "infoscore"  # the search's settings, given on the stage's command line by DVC
BY_HAND = {"num_shards", "shard_id", "merge", "limit", "journal_dir"}  # runs by hand, never the stage's


def test_dvc_tracks_every_option_of_the_generator_and_params_yaml_holds_each():
    assert len(KEYS) == len(set(KEYS)) > 30
    assert tracked_params(ROOT / "dvc.yaml") == set(KEYS)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert [k for k in KEYS if k not in params] == []


def test_the_stage_gives_the_generator_each_value_of_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    args = PARSER.parse_args(stage_argv(ROOT / "params.yaml", ROOT / "dvc.yaml", PARSER))
    for key in KEYS:
        value, parsed = params[key], getattr(args, key)
        if value is None:
            assert parsed == PARSER.get_default(key), key
        else:
            assert (str(parsed) if isinstance(parsed, Path) else parsed) == value, key


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("gt_prob", "false", "gt_prob must be true or false, got 'false' (str)"),
        ("gt_prob", 0, "gt_prob must be true or false, got 0 (int)"),
        ("seed", 1.5, "seed must be an integer, got 1.5 (float)"),
        ("temps", "0.7 1.0", "temps must be a list of numbers, e.g. [0.7, 1.0], got '0.7 1.0' (str)"),
        ("device", "", "device must be a non-empty string (or null for the default), got '' (str)"),
        ("batch_size", True, "batch_size must be an integer, got True (bool)"),
        ("gpus_per_worker", "half", "gpus_per_worker must be a number, got 'half' (str)"),
        ("pool", "k64", "pool must be one of global, per_query, got 'k64' (str)"),
        ("sft_ckpt", ["a.ckpt"], "sft_ckpt must be a non-empty string (or null for the default), got ['a.ckpt']"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(key, value, expected):
    with pytest.raises(InputError) as error:
        argv_from_params({key: value}, PARSER)
    assert expected in str(error.value) and str(error.value).startswith("params.yaml: ")


def _with(tmp_path: Path, **changes) -> Path:
    params = {**yaml.safe_load((ROOT / "params.yaml").read_text()), **changes}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_stage_refuses_a_generator_key_dvc_does_not_track(tmp_path):
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc_yaml["stages"]["generate_rl_data"]["params"].remove("exclude_same_image")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    with pytest.raises(InputError, match="exclude_same_image set the generator, but dvc.yaml's stage"):
        stage_argv(_with(tmp_path), tmp_path / "dvc.yaml", PARSER)


def test_a_key_no_stage_reads_is_refused_by_name(tmp_path):
    params = _with(tmp_path, exclude_same_imge=True)
    for stage in SECTION_STAGES:
        with pytest.raises(InputError, match=r"^params.yaml: exclude_same_imge: no stage of dvc.yaml reads this key"):
            stage_argv(params, ROOT / "dvc.yaml", stage.parser, stage.cli.STAGE, stage.cli.SHARED_PARAMS)
    with pytest.raises(InputError, match=r"^params.yaml: exclude_same_imge: no stage of dvc.yaml reads this key"):
        stage_argv(params, ROOT / "dvc.yaml", PARSER)


def test_a_key_written_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text() + "seed: 7\n")
    with pytest.raises(InputError, match=r"params.yaml: cannot read it: .*duplicate key 'seed'.* line \d+"):
        stage_argv(path, ROOT / "dvc.yaml", PARSER)


@pytest.mark.parametrize("key, value", [("num_shards", 2), ("shard_id", 1), ("merge", True)])
def test_the_stage_is_one_whole_run(tmp_path, key, value):
    with pytest.raises(InputError, match=f"{key}: the DVC stage is one whole run"):
        stage_argv(_with(tmp_path, **{key: value}), ROOT / "dvc.yaml", PARSER)


# -- the beam data stage ---------------------------------------------------------------------------


def _dvc_stage(name: str) -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]


@dataclass(frozen=True)
class SectionStage:
    """A stage whose own settings are a params.yaml section on its command line, and which shares
    top-level keys with the generator (`stage_argv(..., keys=SHARED_PARAMS)`)."""

    cli: ModuleType  # with STAGE, SHARED_PARAMS and build_parser
    section: str
    by_hand: frozenset = frozenset()  # options for runs by hand, never the stage's
    required: tuple = ()  # what a parse needs besides the stage's argv

    @property
    def parser(self):
        return self.cli.build_parser()


SECTION_STAGES = [
    SectionStage(beam_cli, BEAM_SECTION, frozenset(BY_HAND), ("--sampler_cache", "p.json", "--output_path", "b.json")),
    SectionStage(eval_cli, "evaluate", required=(
        "--ckpt", "p.ckpt", "--val_query_emb", "v.pt", "--val_ques_path", "q.json", "--val_ann_path", "a.json",
        "--val_image_root", "i", "--output_dir", "o",
    )),
]  # fmt: skip
STAGE_IDS = [s.cli.STAGE for s in SECTION_STAGES]


@pytest.mark.parametrize("stage", SECTION_STAGES, ids=STAGE_IDS)
def test_every_option_of_a_section_stage_has_one_source_that_dvc_tracks(stage: SectionStage):
    """Each option comes from exactly one place: the stage's command line in dvc.yaml (its files), its
    section (on that command line), a top-level key it shares with the generator, or the runs by hand;
    the section and every shared key are params of the stage."""
    definition = _dvc_stage(stage.cli.STAGE)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    on_command_line = set(re.findall(r"--(\w+)", definition["cmd"]))
    section, shared = set(params[stage.section]), set(stage.cli.SHARED_PARAMS)
    sources = (on_command_line, section, shared, stage.by_hand)
    keys = generator_keys(stage.parser)
    assert [k for k in keys if sum(k in source for source in sources) != 1] == []
    assert set(keys) == set().union(*sources)
    assert f"${{{stage.section}}}" in definition["cmd"]
    assert tracked_params(ROOT / "dvc.yaml", stage.cli.STAGE) == shared | {stage.section}
    assert [k for k in stage.cli.SHARED_PARAMS if k not in params] == []


@pytest.mark.parametrize("stage", SECTION_STAGES, ids=STAGE_IDS)
def test_a_section_stage_gives_the_command_each_shared_value_of_params_yaml(stage: SectionStage):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    parser = stage.parser
    argv = stage_argv(ROOT / "params.yaml", ROOT / "dvc.yaml", parser, stage.cli.STAGE, stage.cli.SHARED_PARAMS)
    args = parser.parse_args([*argv, *stage.required])
    for key in stage.cli.SHARED_PARAMS:
        value, parsed = params[key], getattr(args, key)
        if value is None:
            assert parsed == parser.get_default(key), key
        else:
            assert (str(parsed) if isinstance(parsed, Path) else parsed) == value, key
    flags = {re.match(r"--(\w+)", a).group(1) for a in argv if a.startswith("--")}
    assert flags <= set(stage.cli.SHARED_PARAMS), "the generator's own keys (shot_num, limit) are not the stage's"


@pytest.mark.parametrize("stage", SECTION_STAGES, ids=STAGE_IDS)
def test_a_section_stage_checks_types_and_tracking(stage: SectionStage, tmp_path):
    name, parser = stage.cli.STAGE, stage.parser
    with pytest.raises(InputError, match=r"^params.yaml: batch_size must be an integer, got '8' \(str\)"):
        stage_argv(_with(tmp_path, batch_size="8"), ROOT / "dvc.yaml", parser, name, stage.cli.SHARED_PARAMS)
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc_yaml["stages"][name]["params"].remove("device")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    with pytest.raises(InputError, match=f"device set the {COMMANDS[name]}, but dvc.yaml's stage {name}"):
        stage_argv(_with(tmp_path), tmp_path / "dvc.yaml", parser, name, stage.cli.SHARED_PARAMS)


# -- in a DVC repo --------------------------------------------------------------------------------


def git_commit(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project's files, params.yaml pointing at placeholder inputs, the generation stage committed as is."""
    repo = tmp_path_factory.mktemp("stage_params")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, places in ((params, PLACEHOLDERS), (params["evaluate"], EVALUATE_PLACEHOLDERS)):
        for key, place in places.items():
            section[key] = place.rstrip("/")
            path = repo / place / "placeholder" if place.endswith("/") else repo / place
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"a placeholder for {key}\n")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    beam = repo / "data/beam/beam_data.json"  # the beam data stage's own files (on its command line)
    for output in (repo / params["output_path"], beam):
        for path in (
            output,
            output.with_name(output.name + ".meta.json"),
            output.with_name(output.name + ".journal") / "x",
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
    evaluation = ("breakdown.json", "results.json", "metrics.json")  # the evaluation's outputs
    for path in [repo / "data/pools/sampler_cache.json", *(repo / "data/eval" / name for name in evaluation)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
    run(repo, "git", "init", "-q")
    stages = ["generate_rl_data", *STAGE_IDS]
    dvc(repo, "commit", "--force", *stages)
    git_commit(repo, "project")
    assert json.loads(dvc(repo, "status", "--json", *stages).stdout) == {}
    return repo


def _other_value(action_list, value):
    """A valid value for an option that differs from `value` (derived from the parser's action)."""
    action = action_list[0]
    if isinstance(action, SWITCHES):
        return not (action.default if value is None else value)
    if action.nargs == "*":
        return [0.5]
    if action.choices is not None:
        return next(c for c in action.choices if c != value)
    if action.type is int:
        return (value or 0) + 1
    if action.type is float:
        return (value or 0.5) + 0.25
    return f"{value or 'other'}-changed"


def test_every_generator_setting_changed_in_params_yaml_makes_the_stage_changed(repo: Path):
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    for key in KEYS:
        params[key] = _other_value([a for a in PARSER._actions if a.dest == key], params[key])
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(repo, "status", "--json", "generate_rl_data").stdout)
    finally:
        path.write_text(original)
    changed = {}
    for item in status.get("generate_rl_data", []):
        changed |= item.get("changed deps", {}).get("params.yaml", {})
    assert [k for k in KEYS if changed.get(k) != "modified"] == [], status


@pytest.mark.parametrize("stage", SECTION_STAGES, ids=STAGE_IDS)
def test_every_setting_of_a_section_stage_changed_in_params_yaml_makes_it_changed(stage: SectionStage, repo: Path):
    path, name, actions = repo / "params.yaml", stage.cli.STAGE, stage.parser._actions
    original = path.read_text()
    params = yaml.safe_load(original)
    for key in stage.cli.SHARED_PARAMS:
        params[key] = _other_value([a for a in actions if a.dest == key], params[key])
    for key, value in params[stage.section].items():
        params[stage.section][key] = _other_value([a for a in actions if a.dest == key], value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(repo, "status", "--json", name).stdout)
    finally:
        path.write_text(original)
    changed = {}
    for item in status.get(name, []):
        if isinstance(item, dict):  # also "changed command": the section is on the command line
            changed |= item.get("changed deps", {}).get("params.yaml", {})
    assert [k for k in stage.cli.SHARED_PARAMS if changed.get(k) != "modified"] == [], status
    assert changed.get(stage.section) == "modified", "the section is tracked whole"


def test_a_wrong_type_stops_the_stage_in_one_line(repo: Path):
    path = repo / "params.yaml"
    original = path.read_text()
    path.write_text(original.replace("gt_prob: true", 'gt_prob: "false"'))
    try:
        result = run(repo, sys.executable, "stages/generate_rl_data.py", check=False)
    finally:
        path.write_text(original)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: params.yaml: gt_prob must be true or false, got 'false' (str)"


def test_exp_run_with_a_new_key_reruns_the_stage_or_names_the_key(repo: Path):
    """`-S +key=value`: on a key params.yaml holds, DVC refuses naming it; on one it lacks, the stage runs."""
    present = dvc(repo, "exp", "run", "generate_rl_data", "-S", "+exclude_same_image=true", check=False)
    assert present.returncode != 0 and "exclude_same_image" in present.stderr + present.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    del params["exclude_same_image"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(repo, "without exclude_same_image")
    try:
        absent = dvc(repo, "exp", "run", "generate_rl_data", "-S", "+exclude_same_image=true", check=False)
        output = absent.stdout + absent.stderr
        assert "Running stage 'generate_rl_data'" in output and "didn't change" not in output, output
    finally:
        run(repo, "git", "checkout", "-q", "HEAD~1", "--", "params.yaml")
