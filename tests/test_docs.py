"""The docs cannot rot: every command they show works, every link resolves, every table row about the code holds.

Every fenced `bash` block of README.md, docs/*.md and benchmarks/README.md is split into commands
(backslash continuations joined, comments dropped, `&&`, `;`, `|` split), and each command is of a
known kind, or the test fails:

- run: executed here for real, in this process -- `--help` of every entry point, `journal list`,
  the metric command, and a generator run on the tests' tiny demo inputs (`--limit`);
- parse: handed to its entry point's own argparse parser (the module or script exists and its
  flags parse; placeholder paths are fine) -- the parser is taken from the entry point as it runs;
- dvc: parsed by DVC's own parser; the stages named exist in dvc.yaml, and every `-S key=value`
  names a key of params.yaml whose value passes the stage's type checks (`lever_lm.rl.params`);
- ci: what `.ci/run` runs (setup, lint, the tests, the benchmarks' quick mode);
- elsewhere: cannot run here (a GPU, a cluster), each with its reason (`ELSEWHERE`).

`yaml` blocks headed `# params.yaml` are checked like `-S` settings, and `# --config YAML` blocks
by the config's own reader. The tables of docs/generator.md that say what reuses a journal are
checked row by row against the fingerprints the code computes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import runpy
import shlex
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMAND_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LANGUAGES = {"bash", "text", "yaml", "mermaid"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
# `<flags>` in a command: the generator's input flags (placeholder paths).
FLAGS = "--sft_ckpt S.ckpt --beam_data B.json --output_path RL.json --query_emb Q.pt --cand_emb C.pt".split()
# Commands that cannot run here (a CPU-only machine, no cluster), by their first words, with the reason.
ELSEWHERE = {
    ("ray", "start"): "starts a node of a Ray cluster",
    ("ray", "job", "submit"): "submits to a running Ray cluster (the command after -- is parsed)",
    ("benchmarks/gpu_check.sh",): "needs a CUDA GPU",
    ("benchmarks/run_all.sh",): "full sizes take several minutes; CI runs the quick mode (QUICK=1)",
    ("./setup.sh",): "with TORCH_INDEX: installs a CUDA build of torch, for a GPU machine",
}
# A Slurm batch script (a bash block starting `#!/bin/bash` with `#SBATCH` lines) needs an allocation;
# its python command is parsed.


# -- reading the docs ----------------------------------------------------------------------------


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, text, line number) of every fenced block; the text dedented to its fence."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if stripped.startswith("```"):
            indent, language, start = len(lines[i]) - len(stripped), stripped[3:].strip(), i + 1
            i += 1
            while lines[i].strip() != "```":
                i += 1
            blocks.append((language, "\n".join(line[indent:] for line in lines[start:i]), start))
        i += 1
    return blocks


def logical_lines(text: str) -> Iterator[str]:
    """The block's lines with backslash continuations joined."""
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""


def split_commands(line: str) -> list[list[str]]:
    """The commands of one logical line: tokens (comments dropped) split at `&&`, `;`, `|`, `&`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def substitute(tokens: list[str]) -> list[str]:
    """`<flags>` -> the generator's input flags; shell variables -> 0 (a shard id, a GPU index)."""
    out = []
    for token in tokens:
        out += FLAGS if token == "<flags>" else [re.sub(r"\$\{?\w+\}?", "0", token)]
    return out


def doc_commands() -> list[tuple[str, list[str], str]]:
    """(where, tokens, the whole logical line) of every command in a bash block."""
    found = []
    for path in COMMAND_DOCS:
        for language, text, line_number in fenced_blocks(path):
            if language != "bash":
                continue
            where = f"{path.relative_to(ROOT)}:{line_number}"
            if text.startswith("#!/bin/bash") and "#SBATCH" in text:
                found += [(where, ["<slurm>", *tokens], line) for line in logical_lines(text)
                          for tokens in split_commands(line)]  # fmt: skip
                continue
            found += [(where, tokens, line) for line in logical_lines(text) for tokens in split_commands(line)]
    return found


COMMANDS = doc_commands()


# -- running entry points in this process ----------------------------------------------------------


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class Captured(BaseException):
    """Raised instead of parsing: the entry point's parser and the arguments it was about to parse."""


def run_entry(entry: str, argv: list[str]) -> None:
    """`python -m entry argv` or `python entry argv` (a script path), in this process, from the repo root."""
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [entry, *argv]
    try:
        with warnings.catch_warnings(), working_directory(ROOT):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            if entry.endswith(".py"):
                sys.path.insert(0, str((ROOT / entry).parent))  # as `python script.py` does
                runpy.run_path(str(ROOT / entry), run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


def parser_and_args(entry: str, argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The entry point's parser and its full argument list (a stage script adds params.yaml's flags)."""

    def grab(self, args=None, namespace=None):
        raise Captured(self, list(sys.argv[1:] if args is None else args))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        with mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab):
            try:
                run_entry(entry, argv)
            except Captured as captured:
                return captured.args
    raise AssertionError(f"{entry} finished without parsing its arguments")


def check_parses(entry: str, argv: list[str], where: str) -> argparse.Namespace:
    parser, args = parser_and_args(entry, argv)
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: {entry} {' '.join(argv)}: its parser refuses the arguments")


def entry_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(module or script, arguments) of a python command, after `nice` and environment settings."""
    tokens = list(tokens)
    while tokens and re.fullmatch(r"\w+=.*", tokens[0]):
        tokens.pop(0)
    if tokens[:1] == ["nice"]:
        tokens = tokens[3:] if tokens[1:2] == ["-n"] else tokens[1:]
    if not tokens or tokens[0] not in PYTHONS:
        return None
    if tokens[1] == "-m":
        return tokens[2], tokens[3:]
    return tokens[1], tokens[2:]


# -- the kinds of command ----------------------------------------------------------------------------


def classify(tokens: list[str]) -> str:
    """The kind of a command (see the module doc), or "unknown"."""
    if tokens[0] == "<slurm>":
        return "slurm"
    env = {t.split("=", 1)[0] for t in tokens if re.fullmatch(r"[A-Z_]+=.*", t)}
    words = [t for t in tokens if not re.fullmatch(r"[A-Z_]+=.*", t)]
    found = entry_of(tokens)
    if found is not None:
        entry, argv = found
        if entry == "pytest":
            return "ci"
        if {"--help", "-h"} & set(argv) or (entry in RUN and RUN[entry](argv)):
            return "run"
        return "parse"
    if words[0] == "dvc":
        return "dvc"
    if (words == ["./setup.sh"] and "TORCH_INDEX" not in env) or (
        words == ["benchmarks/run_all.sh"] and "QUICK" in env
    ):
        return "ci"
    if words == [".", ".venv/bin/activate"] or words[0] == ".venv/bin/ruff":
        return "ci"
    if any(tuple(words[: len(prefix)]) == prefix for prefix in ELSEWHERE):
        return "elsewhere"
    return "unknown"


RUN: dict[str, Callable[[list[str]], bool]] = {
    "lever_lm.rl.journal": lambda argv: argv[:1] == ["list"],
    "lever_lm.vqa.metric": lambda argv: True,
    "lever_lm.models.v3.generate_rl_data": lambda argv: "--limit" in argv,
}


@pytest.mark.parametrize("where, tokens, line", COMMANDS, ids=[f"{w} {' '.join(t)[:60]}" for w, t, _ in COMMANDS])
def test_every_command_is_of_a_known_kind(where, tokens, line):
    assert classify(tokens) != "unknown", f"{where}: no rule checks `{' '.join(tokens)}`"


@pytest.mark.parametrize(
    "where, tokens", [(w, t) for w, t, _ in COMMANDS if classify(t) in ("parse", "slurm")], ids=lambda x: str(x)[:70]
)
def test_commands_parse_with_their_entry_points_parser(where, tokens):
    slurm = tokens[0] == "<slurm>"
    found = entry_of(substitute(tokens[1:] if slurm else tokens))
    if found is None:
        assert slurm, where
        return  # a Slurm script's shell lines: they need an allocation
    entry, argv = found
    if argv[:1] == ["--"]:
        argv = argv[1:]
    check_parses(entry, argv, where)


def test_the_commands_after_ray_job_submit_parse():
    submitted = [(w, t) for w, t, _ in COMMANDS if t[:3] == ["ray", "job", "submit"]]
    assert submitted, "docs/scale.md shows a Ray job"
    for where, tokens in submitted:
        entry, argv = entry_of(substitute(tokens[tokens.index("--") + 1 :]))
        check_parses(entry, argv, where)


# -- what CI runs ---------------------------------------------------------------------------------------


def test_ci_runs_the_readmes_test_command_and_the_benchmarks_quick_mode():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    readme = [line for _, text, _ in fenced_blocks(ROOT / "README.md") for line in logical_lines(text)]
    test_command = next(line for line in readme if "pytest" in line)
    assert test_command in ci, "`.ci/run` must run exactly the README's test command"
    assert "QUICK=1 benchmarks/run_all.sh" in ci
    ci_commands = [tokens for line in ci if not line.startswith("#") for tokens in split_commands(line)]
    for where, tokens, _ in COMMANDS:
        if classify(tokens) == "ci" and tokens != [".", ".venv/bin/activate"]:
            assert tokens in ci_commands, f"{where}: `{' '.join(tokens)}` is not what CI runs"


# -- commands executed for real -------------------------------------------------------------------------


def entry_points() -> list[str]:
    modules = ["lever_lm.evaluation"]
    for path in sorted((ROOT / "lever_lm").rglob("*.py")):
        if '__name__ == "__main__"' in path.read_text(encoding="utf-8"):
            modules.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    scripts = [str(p.relative_to(ROOT)) for p in sorted([*ROOT.glob("stages/*.py"), *ROOT.glob("benchmarks/*.py")])]
    return modules + scripts


@pytest.mark.parametrize("entry", entry_points())
def test_every_entry_point_answers_help(entry, capsys):
    with pytest.raises(SystemExit) as stop:
        run_entry(entry, ["--help"])
    assert stop.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_every_entry_point_the_docs_name_exists():
    known = set(entry_points())
    for where, tokens, _ in COMMANDS:
        found = entry_of(tokens[1:] if tokens[0] == "<slurm>" else tokens)
        if found is not None and found[0] != "pytest":
            assert found[0] in known, f"{where}: {found[0]} is not an entry point"


@pytest.fixture
def doc_paths(rl_inputs, tmp_path) -> dict[str, Path]:
    """The pipeline's paths the docs use, mapped to the tests' demo inputs (outputs into tmp_path)."""
    vqa = rl_inputs.vqa
    results = tmp_path / "R.json"
    annotations = json.loads((vqa / "mscoco_train2014_annotations.json").read_text(encoding="utf-8"))["annotations"]
    results.write_text(json.dumps([{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]}
                                   for a in annotations[:20]]), encoding="utf-8")  # fmt: skip
    return {
        "data/sft/pointer_v2.ckpt": rl_inputs.sft_ckpt,
        "data/beam/beam_data.json": rl_inputs.beam_data,
        "data/demo/cache/query_embeddings.pt": rl_inputs.query_emb,
        "data/demo/cache/candidate_embeddings.pt": rl_inputs.cand_emb,
        "data/demo/models/qwen2.5-vl-demo": rl_inputs.vlm,
        "data/rl/rl_data.json.journal": Path(f"{rl_inputs.beam_data}.journal"),
        "Q.json": vqa / "OpenEnded_mscoco_train2014_questions.json",
        "A.json": vqa / "mscoco_train2014_annotations.json",
        "R.json": results,
        **{f"data/demo/vqa/{p.name}": p for p in vqa.iterdir()},
        "data/demo/vqa/mscoco2014/train2014": vqa / "mscoco2014" / "train2014",
    }


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "where, tokens",
    [(w, t) for w, t, _ in COMMANDS if classify(t) == "run" and not {"--help", "-h"} & set(t)],
    ids=lambda x: str(x)[:70],
)
def test_commands_run_on_the_tests_demo_inputs(where, tokens, doc_paths, tmp_path, capsys):
    entry, argv = entry_of(tokens)
    mapped = []
    for token in argv:
        if token in doc_paths:
            mapped.append(str(doc_paths[token]))
        elif token.startswith("data/"):  # an output of the command
            mapped.append(str(tmp_path / token))
        else:
            mapped.append(token)
    try:
        run_entry(entry, mapped)
    except SystemExit as stop:
        assert stop.code in (0, None), f"{where}: {entry} {' '.join(mapped)}: exit {stop.code}"
    out = capsys.readouterr().out
    if entry == "lever_lm.models.v3.generate_rl_data":
        written = json.loads((tmp_path / "data/by_hand/rl_data.json").read_text(encoding="utf-8"))
        assert len(written) == int(argv[argv.index("--limit") + 1])
    else:
        assert out.strip(), f"{where}: {entry} printed nothing"


# -- dvc commands and params.yaml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def section_parsers() -> dict[str, list[tuple[argparse.ArgumentParser, tuple[str, ...] | None]]]:
    """For each params.yaml section (the top level: ""), the parsers of the commands it feeds, each with
    the keys it takes from there (None: every key that names one of its flags)."""
    from lever_lm.evaluation.cli import SHARED_PARAMS as EVALUATION_KEYS
    from lever_lm.infoscore.cli import SHARED_PARAMS as BEAM_KEYS

    def parser(entry: str) -> argparse.ArgumentParser:
        return parser_and_args(entry, [])[0]

    top = [
        (parser("lever_lm.models.v3.generate_rl_data"), None),
        (parser("lever_lm.infoscore.cli"), BEAM_KEYS),
        (parser("lever_lm.evaluation"), EVALUATION_KEYS),
        (parser("lever_lm.rl.validate"), ("max_failed_share", "audit")),
    ]
    sections = {
        "infoscore": ["lever_lm.infoscore.cli"],
        "evaluate": ["lever_lm.evaluation"],
        "sample_pools": ["lever_lm.models.v3.samplers"],
        "sft": ["lever_lm.models.v2.train_sft"],
        "embeddings": ["lever_lm.models.v3.export_embeddings"],
        "demo": ["lever_lm.demo.build", "lever_lm.demo.train_vlm"],
        "demo_vlm": ["lever_lm.demo.train_vlm"],
        "demo_clip": ["lever_lm.demo.train_clip"],
    }
    return {"": top, **{name: [(parser(entry), None) for entry in entries] for name, entries in sections.items()}}


def check_param(key: str, value: object, parsers: dict, where: str) -> None:
    """A params.yaml key exists and `value` passes the type checks of the command(s) it feeds."""
    from lever_lm.errors import InputError
    from lever_lm.rl.params import argv_from_params, generator_keys

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    section, _, name = key.rpartition(".")
    node = params.get(section) if section else params
    assert isinstance(node, dict) and name in node, f"{where}: {key} is not a key of params.yaml"
    feeds = [p for p, keys in parsers.get(section, []) if name in generator_keys(p) and (keys is None or name in keys)]
    assert feeds, f"{where}: {key} feeds no command's flag"
    for parser in feeds:
        try:
            argv_from_params({name: value}, parser, source=where)
        except InputError as error:
            pytest.fail(str(error))


def dvc_commands() -> list[tuple[str, list[str]]]:
    return [(w, t) for w, t, _ in COMMANDS if classify(t) == "dvc"]


@pytest.mark.parametrize("where, tokens", dvc_commands(), ids=lambda x: str(x)[:70])
def test_dvc_commands_name_real_stages_and_params(where, tokens, section_parsers):
    from dvc.cli.parser import get_main_parser

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    try:
        args = get_main_parser().parse_args(tokens[1:])
    except SystemExit:
        pytest.fail(f"{where}: dvc refuses `{' '.join(tokens)}`")
    if tokens[1] in ("repro", "exp") and getattr(args, "targets", None):
        assert set(args.targets) <= set(stages), f"{where}: no such stage in dvc.yaml: {args.targets}"
    for setting in getattr(args, "set_param", None) or []:
        key, _, value = setting.partition("=")
        check_param(key, yaml.safe_load(value), section_parsers, where)


def leaves(mapping: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in mapping.items():
        if isinstance(value, dict) and not prefix:
            yield from leaves(value, f"{key}.")
        else:
            yield f"{prefix}{key}", value


def test_yaml_blocks_are_params_or_configs_the_code_accepts(section_parsers):
    from lever_lm.data.dataset_paths import FIELDS
    from lever_lm.vqa.backends.base import default_dtype
    from lever_lm.vqa.model_config import resolve_settings

    seen = set()
    for path in COMMAND_DOCS:
        for language, text, line_number in fenced_blocks(path):
            if language != "yaml":
                continue
            where, head = f"{path.relative_to(ROOT)}:{line_number}", text.splitlines()[0]
            block = yaml.safe_load(text)
            if head == "# params.yaml":
                for key, value in leaves(block):
                    check_param(key, value, section_parsers, where)
            elif head == "# --config YAML":
                settings = resolve_settings("chat", block)
                default_dtype(__import__("torch").device("cpu"), settings.dtype)
                assert set(block.get("dataset", {})) <= {*FIELDS, "val_ques_path", "val_ann_path"}, where
            else:
                pytest.fail(f"{where}: a yaml block must start with `# params.yaml` or `# --config YAML`")
            seen.add(head)
    assert seen == {"# params.yaml", "# --config YAML"}


def test_every_fenced_block_names_its_language():
    for path in [*COMMAND_DOCS, ROOT / "docs" / "formats.md"]:
        for language, _, line_number in fenced_blocks(path):
            assert language in LANGUAGES, f"{path.relative_to(ROOT)}:{line_number}: fence language {language!r}"


# -- links ----------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The file without its fenced blocks (a `#` line in a code block is no heading)."""
    out, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return "\n".join(out)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    found: dict[str, int] = {}
    for line in prose(path).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found[slug if slug not in found else f"{slug}-{found[slug]}"] = found.get(slug, 0) + 1
    return set(found)


LINKED_DOCS = [*COMMAND_DOCS, ROOT / "docs" / "formats.md"]


@pytest.mark.parametrize("path", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    for target in LINK.findall(prose(path)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.relative_to(ROOT)}: {target}: no such file"
        if anchor:
            assert anchor in anchors(resolved), f"{path.relative_to(ROOT)}: {target}: no such heading"


def test_the_readme_is_short_and_lists_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README's table of docs lacks {page.name}"


# -- what the docs say about the code ------------------------------------------------------------------------------


def table_after(path: Path, heading: str, index: int = 0) -> list[list[str]]:
    """The cells of the `index`-th table after `heading` (header and rule left out)."""
    text = prose(path)
    lines = text[text.index(heading) :].splitlines()
    tables, current = [], []
    for line in lines[1:]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif current:
            tables.append(current[2:])
            current = []
        if line.startswith("## ") and tables:
            break
    return tables[index]


def test_the_generators_flag_table_lists_every_flag():
    parser, _ = parser_and_args("lever_lm.models.v3.generate_rl_data", [])
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    table = table_after(ROOT / "docs" / "generator.md", "## Flags")
    documented = {flag for row in table for flag in re.findall(r"`(--\w+)`", row[0])}
    assert documented == flags


def test_the_chains_cost_table_follows_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    pool, beams = params["sample_pools"]["pool_size"], params["infoscore"]["beam_size"]
    assert params["infoscore"]["shot_num"] == 2  # the formula below is the 2-shot one
    prompts = 1 + pool + beams * (pool - 1)
    candidates = params["num_beams"] + len(params["temps"]) * params["num_samples_per_temp"] + params["num_random"]
    generations = 1 + params["evaluate"]["num_random"] + 1 + 1
    table = {row[0]: row[2] for row in table_after(ROOT / "docs" / "pipeline.md", "## The whole chain at real scale")}
    assert f"= {prompts} teacher-forced" in table["`beam_data`"]
    assert f"up to {candidates} VLM generations" in table["`generate_rl_data`"]
    assert f"= {generations} VLM generations" in table["`evaluate`"]


# The journal tables of docs/generator.md: each row's checks are pairs of runs whose journals the row
# says are the same file (reused) or not. A check is (argv and request changes of run a, of run b).
Change = tuple[list[str], Callable | None]


@pytest.fixture(scope="module")
def edited(rl_inputs, tmp_path_factory) -> dict[str, Path]:
    """Copies of the inputs: the same bytes elsewhere, and with one byte or pool changed."""
    tmp = tmp_path_factory.mktemp("edited")
    vqa = rl_inputs.vqa
    out = {
        "ckpt": shutil.copy(rl_inputs.sft_ckpt, tmp / "sft.ckpt"),
        "cand_emb": shutil.copy(rl_inputs.cand_emb, tmp / "cand.pt"),
        "model": shutil.copytree(rl_inputs.vlm, tmp / "model"),
        "model_edited": shutil.copytree(rl_inputs.vlm, tmp / "model_edited"),
        "images": shutil.copytree(vqa / "mscoco2014" / "train2014", tmp / "images"),
        "images_edited": shutil.copytree(vqa / "mscoco2014" / "train2014", tmp / "images_edited"),
        "val_ques": shutil.copy(vqa / "OpenEnded_mscoco_train2014_questions.json", tmp / "val_q.json"),
        "val_ann": shutil.copy(vqa / "mscoco_train2014_annotations.json", tmp / "val_a.json"),
    }
    with open(out["model_edited"] / "config.json", "a", encoding="utf-8") as handle:
        handle.write("\n")
    image = sorted(out["images_edited"].iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")
    for name, source in [("beam", rl_inputs.beam_data), ("train_ann", vqa / "mscoco_train2014_annotations.json"),
                         ("val_ann_edited", vqa / "mscoco_train2014_annotations.json")]:  # fmt: skip
        out[name] = tmp / f"{name}.json"
        out[name].write_text(json.dumps(json.loads(source.read_text(encoding="utf-8")), indent=1), encoding="utf-8")
    pools = json.loads(rl_inputs.sampler_cache.read_text(encoding="utf-8"))
    first = next(iter(pools))
    out["pools"] = tmp / "pools.json"
    out["pools"].write_text(json.dumps({**pools, first: pools[first][::-1]}), encoding="utf-8")
    for name, settings in {
        "system_prompt": {"system_prompt": "Answer briefly."},
        "icd_template": {"icd_template": "Q:{question} A:{answer}"},
        "query_template": {"query_template": "Q:{question} A:"},
        "generation": {"generation": {"max_new_tokens": 4}},
        "processor_kwargs": {"processor_kwargs": {"size": {"shortest_edge": 3136, "longest_edge": 200704}}},
        "dtype": {"dtype": "bfloat16"},
        "attn_implementation": {"attn_implementation": "eager"},
        "vision_attn_implementation": {"vision_attn_implementation": "eager"},
        "batch_size": {"batch_size": 4},
        "image_cache_mb": {"image_cache_mb": 10},
        "prefetch_threads": {"prefetch_threads": 1},
    }.items():
        out[f"config_{name}"] = tmp / f"{name}.yaml"
        out[f"config_{name}"].write_text(yaml.safe_dump({"vqa_model": settings}), encoding="utf-8")
    return out


def journal_of(build: Callable, argv: list[str], change: Callable | None = None) -> Path:
    """The journal file a run with `argv` (and its request changed by `change`) opens."""
    plan = build(argv, change)
    return plan.journal_path(plan.request.shard_id)


@contextlib.contextmanager
def versions(torch_version: str) -> Iterator[None]:
    import torch

    with mock.patch.object(torch, "__version__", torch_version):
        yield


def rl_rows(rl_inputs, e: dict[str, Path], tmp: Path) -> dict[str, list[tuple[Change, Change]]]:
    replace = dataclasses.replace
    base: Change = ([], None)
    cuda0: Change = (["--device", "cuda:0"], None)
    per_query = ["--pool", "per_query", "--pool_size", "8"]
    config = lambda name: ([f"--config={e[f'config_{name}']}"], None)  # noqa: E731
    return {
        "`--num_beams`, `--temps`, `--num_samples_per_temp`, `--num_random`, `--num_retrieval`, "
        "`--exclude_same_image`, `--seed`, `--shot_num`": [
            (base, (flags, None))
            for flags in (
                ["--num_beams", "3"],
                ["--temps", "1.0", "1.5"],
                ["--num_samples_per_temp", "2"],
                ["--num_random", "2"],
                ["--num_retrieval", "1"],
                ["--exclude_same_image"],
                ["--seed", "1"],
                ["--shot_num", "1"],
            )  # fmt: skip
        ],
        "`--proposal_block`": [(base, (["--proposal_block", "4"], None))],
        "`--pool per_query`, and with it `--pool_size`, `--sampler`, the sampler cache's content": [
            (base, ([*per_query, "--sampler", "rand"], None)),
            (([*per_query, "--sampler", "rand"], None), (["--pool", "per_query", "--pool_size", "6"], None)),
            (
                ([*per_query, "--sampler", "rand"], None),
                ([*per_query, f"--sampler_cache={rl_inputs.sampler_cache}"], None),
            ),
            (
                ([*per_query, f"--sampler_cache={rl_inputs.sampler_cache}"], None),
                ([*per_query, f"--sampler_cache={e['pools']}"], None),
            ),
        ],  # fmt: skip
        "`--pool_size`, `--sampler`, `--sampler_cache` with `--pool global`": [
            (base, (["--pool_size", "16", "--sampler", "rand"], None)),
            (base, ([f"--sampler_cache={e['pools']}"], None)),
        ],
        "`--eval_mode`, `--no_gt_prob`": [
            (base, (["--eval_mode", "official"], None)),
            (base, (["--no_gt_prob"], None)),
        ],
        "`--vqa_model`, the content of any file of the model directory": [
            (base, (["--vqa_model", "hf_image_text_to_text"], None)),
            (([f"--vqa_model_path={e['model']}"], None), ([f"--vqa_model_path={e['model_edited']}"], None)),
        ],
        "the model directory's path, same files": [(base, ([f"--vqa_model_path={e['model']}"], None))],
        "the config's `vqa_model`: `system_prompt`, `icd_template`, `query_template`, `generation`, "
        "`processor_kwargs`, `dtype`, `attn_implementation`, `vision_attn_implementation`": [
            (base, config(name))
            for name in (
                "system_prompt",
                "icd_template",
                "query_template",
                "generation",
                "processor_kwargs",
                "dtype",
                "attn_implementation",
                "vision_attn_implementation",
            )  # fmt: skip
        ],
        "the config's `vqa_model`: `batch_size`, `image_cache_mb`, `prefetch_threads`; `--batch_size`": [
            *[(base, config(name)) for name in ("batch_size", "image_cache_mb", "prefetch_threads")],
            (base, (["--batch_size", "4"], None)),
        ],
        "the device type (`--device cpu` to `cuda:0`)": [(base, cuda0)],
        "the device index (`cuda:0` to `cuda:1`)": [(cuda0, (["--device", "cuda:1"], None))],
        "the torch or transformers version": [(base, ([], "torch 0.0.1"))],
        "the content of `--sft_ckpt`, `--beam_data`, `--query_emb`, `--cand_emb`, the training questions and "
        "annotations, `--val_ques_path`, `--val_ann_path`": [
            (base, ([f"--beam_data={e['beam']}"], None)),
            (base, ([f"--train_ann_path={e['train_ann']}"], None)),
            (
                ([f"--val_ques_path={e['val_ques']}", f"--val_ann_path={e['val_ann']}"], None),
                ([f"--val_ques_path={e['val_ques']}", f"--val_ann_path={e['val_ann_edited']}"], None),
            ),
        ],  # fmt: skip
        "an input's path, same bytes": [
            (base, ([f"--sft_ckpt={e['ckpt']}", f"--cand_emb={e['cand_emb']}"], None)),
        ],
        "the content of any image of the training split": [
            (([f"--train_image_root={e['images']}"], None), ([f"--train_image_root={e['images_edited']}"], None)),
        ],
        "`--limit`, `--engine`, `--ray_address`, `--num_workers`, `--gpus_per_worker`, `--no_progress`, the torch "
        "thread count": [
            (base, (["--limit", "2"], None)),
            (
                base,
                (["--engine", "ray", "--ray_address", "auto", "--num_workers", "2", "--gpus_per_worker", "0"], None),
            ),
            (base, ([], lambda r: replace(r, progress=True))),
            (base, ([], "threads 2")),
        ],
        "`--num_shards`": [(base, (["--num_shards", "2"], None))],
        "`--output_path`, when `--journal_dir` is unset": [
            (base, ([f"--output_path={tmp / 'other' / 'rl.json'}"], None))
        ],
        "`--output_path`, with the same `--journal_dir`": [
            (
                ([f"--journal_dir={tmp / 'j'}"], None),
                ([f"--journal_dir={tmp / 'j'}", f"--output_path={tmp / 'o.json'}"], None),
            ),
        ],  # fmt: skip
    }


def beam_rows(e: dict[str, Path]) -> dict[str, list[tuple[Change, Change]]]:
    base: Change = ([], None)
    return {
        "`--shot_num`, `--beam_size`, `--ranking`, `--construct_order`": [
            (base, (flags, None))
            for flags in (
                ["--shot_num", "1"],
                ["--beam_size", "2"],
                ["--ranking", "last"],
                ["--construct_order", "left"],
            )
        ],
        "the content of the sampler cache, the training questions and annotations, any image": [
            (base, ([f"--sampler_cache={e['pools']}"], None)),
            (base, ([f"--train_ann_path={e['train_ann']}"], None)),
            (([f"--train_image_root={e['images']}"], None), ([f"--train_image_root={e['images_edited']}"], None)),
        ],
        "the config's `vqa_model`: `system_prompt` (any prompt or numerics setting, as above)": [
            (base, ([f"--config={e['config_system_prompt']}"], None)),
            (base, ([f"--config={e['config_dtype']}"], None)),
        ],
        "the config's `vqa_model`: `generation`": [(base, ([f"--config={e['config_generation']}"], None))],
        "`--batch_size`, `--limit`, `--engine`, the device index": [
            (base, (["--batch_size", "4", "--limit", "2", "--engine", "ray"], None)),
            ((["--device", "cuda:0"], None), (["--device", "cuda:1"], None)),
        ],
    }


def check_rows(table: list[list[str]], rows: dict, build: Callable, code_row: str, result_code: tuple) -> None:
    import torch

    documented = {row[0]: row[1] for row in table}
    assert set(documented) == {*rows, code_row}, "the table's rows and the test's checks differ"
    code = set(re.findall(r"`([\w/.]+)`", code_row)) - {"lever_lm/"}
    assert code == set(result_code), "the table's code row is not the fingerprint's code"
    for row, pairs in rows.items():
        for a, b in pairs:
            journals = []
            for argv, change in (a, b):
                if change == "threads 2":
                    threads = torch.get_num_threads()
                    torch.set_num_threads(2 if threads != 2 else 1)
                    try:
                        journals.append(journal_of(build, argv))
                    finally:
                        torch.set_num_threads(threads)
                elif change == "torch 0.0.1":
                    with versions("0.0.1"):
                        journals.append(journal_of(build, argv))
                else:
                    journals.append(journal_of(build, argv, change))
            reused = "yes" if journals[0] == journals[1] else "no"
            assert documented[row] == reused, f"{row}: {a} vs {b}: the journal is reused: {reused}"


def test_the_journal_tables_hold(rl_inputs, edited, tmp_path):
    from lever_lm.infoscore import cli as beam_cli
    from lever_lm.infoscore.generate import RESULT_CODE as BEAM_CODE
    from lever_lm.infoscore.generate import plan_beam_data
    from lever_lm.rl import cli as rl_cli
    from lever_lm.rl.fingerprints import RESULT_CODE
    from lever_lm.rl.generate import plan_run

    def rl_build(argv, change=None):
        request = rl_cli.request_from_args(
            rl_cli.build_parser().parse_args(rl_inputs.generator_argv(tmp_path / "rl.json", *argv))
        )
        return plan_run(change(request) if change else request)

    def beam_build(argv, change=None):
        flags = ["--sampler_cache", str(rl_inputs.sampler_cache), "--output_path", str(tmp_path / "beam.json"),
                 "--vqa_model_path", str(rl_inputs.vlm), *rl_inputs.dataset_flags(), "--device", "cpu", *argv]  # fmt: skip
        return plan_beam_data(beam_cli.request_from_args(beam_cli.build_parser().parse_args(flags)))

    page = ROOT / "docs" / "generator.md"
    heading = "## What a result depends on"
    rl_table, beam_table = table_after(page, heading, 0), table_after(page, heading, 1)
    rl_code = next(row[0] for row in rl_table if row[0].startswith("the code in"))
    beam_code = next(row[0] for row in beam_table if row[0].startswith("the code in"))
    check_rows(rl_table, rl_rows(rl_inputs, edited, tmp_path), rl_build, rl_code, RESULT_CODE)
    check_rows(beam_table, beam_rows(edited), beam_build, beam_code, BEAM_CODE)
