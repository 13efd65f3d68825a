"""The DVC pipeline on the embedded demo, in a temporary git repo built from the project.

Settings are shrunk (8 queries, 2 beams, ...) so the whole module takes about a minute or two.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc_commands import dvc, run

from lever_lm.models.v2.checkpoint import load_pointer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL_PARAMS = {
    "num_beams": 2,
    "temps": [1.0],
    "num_samples_per_temp": 1,
    "num_random": 1,
    "sample_pools": {"num_queries": 8, "pool_size": 16},
    "pool_size": 16,  # the generator's per-query pools are the sampler cache's
    "demo_clip": {"steps": 30},
    "sft": {"epochs": 5},
    "evaluate": {"num_random": 1, "num_queries": 12},
    "demo_vlm": {"vision_steps": 150, "steps": 150},  # enough for answers (and gt_prob) to mean something
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repo holding the project's tracked files, small params, after one `dvc repro`."""
    repo = tmp_path_factory.mktemp("pipeline")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in SMALL_PARAMS.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project")
    dvc(repo, "repro")
    return repo


def test_repro_builds_everything_and_a_second_repro_is_a_no_op(repo: Path):
    data = json.loads((repo / "data/rl/rl_data.json").read_text())
    assert len(data) == 8
    metrics = json.loads((repo / "data/rl/metrics.json").read_text())
    assert metrics["queries"] == 8 and metrics["candidates"] > 0
    assert (repo / "data/rl/plots/group_reward_std.png").is_file()
    assert load_pointer_checkpoint(repo / "data/sft/pointer_v2.ckpt").hidden_dim == 256  # what the lineage builds
    assert set(json.loads((repo / "data/sft/metrics.json").read_text())) == {
        "sft_train_loss",
        "sft_val_loss",
        "sft_val_acc",
    }
    evaluation = json.loads((repo / "data/eval/metrics.json").read_text())
    assert set(evaluation) == {"eval_pointer", "eval_random", "eval_retrieval", "eval_zero"}
    assert all(0.0 <= value <= 1.0 for value in evaluation.values())
    again = dvc(repo, "repro")
    assert "Running stage" not in again.stdout
    assert "up to date" in again.stdout
    assert dvc(repo, "config", "core.analytics").stdout.strip() == "false"


def test_gt_prob_carries_the_signal_of_accuracy_and_more(repo: Path):
    """On the demo: correct candidates get a clearly higher vqa_gt_prob, it ranks like accuracy, and it
    still tells candidates apart where accuracy cannot (groups whose accuracy is flat)."""
    data = json.loads((repo / "data/rl/rl_data.json").read_text())
    candidates = [c for e in data.values() for c in e["pointer_candidates"]]
    assert all(0.0 <= c["vqa_gt_prob"] <= 1.0 for c in candidates)
    metrics = json.loads((repo / "data/rl/metrics.json").read_text())
    breakdown = json.loads((repo / "data/rl/metrics_breakdown.json").read_text())["gt_prob"]
    assert metrics["gt_rho"] >= 0.3
    assert breakdown["mean_when_correct"] >= breakdown["mean_when_incorrect"] + 0.1
    assert breakdown["accuracy_flat_groups"] > 0 and breakdown["share_of_them_where_gt_prob_differs"] > 0.5
    modes = json.loads((repo / "data/rl/metrics_breakdown.json").read_text())["reward_modes"]
    assert modes["hard01_plus_gtprob"]["non_flat"] >= modes["hard_plus_soft"]["non_flat"]


def test_exp_run_with_other_temperatures(repo: Path):
    dvc(repo, "exp", "run", "-S", "temps=[0.7,1.0,1.3]")
    data = json.loads((repo / "data/rl/rl_data.json").read_text())
    temperatures = {
        c["temperature"] for e in data.values() for c in e["pointer_candidates"] if c["gen_method"] == "sample"
    }
    assert 0.7 in temperatures and 1.3 in temperatures
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    runs = [run["data"] for exp in experiments for run in exp.get("revs", [])]
    assert any(r["params"]["params.yaml"]["data"]["temps"] == [0.7, 1.0, 1.3] for r in runs)
    assert any("non_flat" in r["metrics"]["data/rl/metrics.json"]["data"] for r in runs)
    assert any("eval_pointer" in r["metrics"]["data/eval/metrics.json"]["data"] for r in runs)


def test_exp_run_with_per_query_pools(repo: Path):
    dvc(repo, "exp", "run", "-S", "pool=per_query")
    data = json.loads((repo / "data/rl/rl_data.json").read_text())
    cache = json.loads((repo / "data/pools/sampler_cache.json").read_text())
    beam = json.loads((repo / "data/beam/beam_data.json").read_text())
    assert list(data) == list(beam) == list(cache), "the beam data's queries are the sampler cache's"
    for key, entry in data.items():
        assert entry["candidate_pool_ids"] == cache[key] and len(cache[key]) == 16
        assert all(set(ids[:-1]) <= set(cache[key]) for ids in beam[key]["id_list"])
        assert all(c["pointer_global"] == [cache[key][i] for i in c["pointer"]] for c in entry["pointer_candidates"])
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    runs = [run["data"] for commit in shown for exp in (commit.get("experiments") or []) for run in exp.get("revs", [])]
    per_query = [r for r in runs if r["params"]["params.yaml"]["data"]["pool"] == "per_query"]
    assert per_query and "non_flat" in per_query[0]["metrics"]["data/rl/metrics.json"]["data"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(
        yaml.safe_dump({**params, "pool": "global"}, sort_keys=False)
    )  # for the next tests


def test_an_interrupted_generation_resumes_under_repro(repo: Path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["seed"] = 7  # new settings: a new journal, nothing done yet
    params["batch_size"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    journal_root = repo / "data/rl/rl_data.json.journal"
    lines, deadline = 0, time.time() + 180
    while time.time() < deadline and process.poll() is None and lines < 2:
        lines = _journaled(journal_root, seed=7)
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= lines < 8, "the kill should land mid-generation"
    resumed = dvc(repo, "repro")
    done_before = int(re.search(r"(\d+) of 8 queries already done", resumed.stdout + resumed.stderr).group(1))
    assert done_before >= lines
    data = json.loads((repo / "data/rl/rl_data.json").read_text())
    assert len(data) == 8


def _journaled(journal_root: Path, seed: int) -> int:
    """Queries in the journal of the run with this seed (0 until it exists; line 1 is the header)."""
    for settings in journal_root.glob("*/settings.json"):
        journal = settings.with_name("shard-0-of-1.jsonl")
        if json.loads(settings.read_text())["proposal"]["seed"] == seed and journal.exists():
            return max(journal.read_bytes().count(b"\n") - 1, 0)
    return 0


def test_validation_stage_fails_on_a_corrupted_rl_file(repo: Path):
    path = repo / "data/rl/rl_data.json"
    data = json.loads(path.read_text())
    first = next(iter(data))
    data[first]["pointer_candidates"][0]["pointer"][0] = int(first)  # the query in its own prompt
    path.write_text(json.dumps(data))
    result = dvc(repo, "repro", "--single-item", "validate", check=False)
    assert result.returncode != 0
    assert "its sha256 is not the one its meta sidecar" in result.stdout + result.stderr
    meta_path = repo / "data/rl/rl_data.json.meta.json"  # a careful forger updates the sidecar too
    meta = json.loads(meta_path.read_text())
    meta["data_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    result = dvc(repo, "repro", "--single-item", "validate", check=False)
    assert result.returncode != 0
    assert "contains the query itself" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "edit, stages",
    [
        ("configs/generate.yaml", {"generate_rl_data", "beam_data"}),
        (
            "data/demo/vqa/mscoco_train2014_annotations.json",
            {"generate_rl_data", "export_embeddings", "validate", "sample_pools", "beam_data"},
        ),
        ("data/demo/vqa/mscoco2014/train2014", {"generate_rl_data", "export_embeddings", "sample_pools", "beam_data"}),
    ],
)
def test_dvc_sees_every_input_of_the_generator(repo: Path, edit: str, stages: set[str]):
    path = repo / edit
    if path.is_dir():  # an image edited in place
        path = sorted(path.iterdir())[0]
    before = path.read_bytes()
    try:
        path.write_bytes(before + (b"\n# edited\n" if path.suffix == ".yaml" else b" "))
        status = json.loads(dvc(repo, "status", "--json").stdout)
        assert stages <= set(status), status
    finally:
        path.write_bytes(before)


def test_retraining_the_vqa_model_reruns_the_scoring(repo: Path):
    result = dvc(repo, "exp", "run", "-S", "demo_vlm.steps=31")
    output = result.stdout + result.stderr
    assert "Running stage 'demo_vlm'" in output and "Running stage 'generate_rl_data'" in output
    assert "Running stage 'beam_data'" in output, "InfoScore is the VQA model's too"
    assert re.search(r"0 of 8 queries already done", output), "the new model's scores must not be reused"


def test_user_inputs_are_never_written_by_the_demo_stages(repo: Path):
    """Pointing params.yaml at one's own beam data and checkpoint: the stages keep to their own outputs."""
    mine = repo / "mine"
    mine.mkdir(exist_ok=True)
    for name, source in (("beam.json", "data/beam/beam_data.json"), ("sft.ckpt", "data/sft/pointer_v2.ckpt")):
        shutil.copy2(repo / source, mine / name)
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params.update(beam_data="mine/beam.json", sft_ckpt="mine/sft.ckpt")
    params["infoscore"] = {**params["infoscore"], "beam_size": 4}  # the beam data is made again
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        result = dvc(repo, "repro")
        assert "Running stage 'beam_data'" in result.stdout
        assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    finally:
        params_path.write_text(original)
