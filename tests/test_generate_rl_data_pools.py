"""The RL data generator with per-query pools (`--pool per_query`), end to end on the demo.

The reference run scores with the tiny Qwen2.5-VL; the other checks that need no real answers
use an echo backend, whose "answer" is the names of the ICD images of its prompt, so each record
shows which items its prompt really held.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lever_lm.data.beam_data import load_beam_data
from lever_lm.data.vqa import VQADataset
from lever_lm.errors import InputError
from lever_lm.io import read_json
from lever_lm.models.v3 import generate_rl_data
from lever_lm.models.v3.pools import RandomPools
from lever_lm.models.v3.proposals import ImageGroups
from lever_lm.rl.checks import expectations_for, load_rl_data, validate_rl_data
from lever_lm.rl.cli import request_from_args
from lever_lm.rl.generate import plan_run, run_generation
from lever_lm.rl.meta import read_meta
from lever_lm.rl.validate import ValidationOutputs, run_validation
from lever_lm.vqa.backends.base import Generation

SMALL = ["--num_beams", "2", "--temps", "1.0", "--num_samples_per_temp", "1", "--num_random", "1", "--device", "cpu"]
POOL_SIZE = 16
LAYOUT = ["--proposal_block", "4", "--limit", "8"]  # 8 queries in 2 blocks: room for a kill and for 2 shards


def argv(rl_inputs, output: Path, *extra: str) -> list[str]:
    return [
        "--sft_ckpt", str(rl_inputs.sft_ckpt), "--beam_data", str(rl_inputs.beam_data),
        "--output_path", str(output), "--query_emb", str(rl_inputs.query_emb), "--cand_emb", str(rl_inputs.cand_emb),
        "--vqa_model_path", str(rl_inputs.vlm), *rl_inputs.dataset_flags(), *SMALL, "--no_progress", *extra,
    ]  # fmt: skip


def per_query(cache: Path, *extra: str) -> list[str]:
    return ["--pool", "per_query", "--pool_size", str(POOL_SIZE), "--sampler_cache", str(cache), *LAYOUT, *extra]


def _dataset(rl_inputs) -> VQADataset:
    vqa = rl_inputs.vqa
    return VQADataset.load(
        vqa / "OpenEnded_mscoco_train2014_questions.json",
        vqa / "mscoco_train2014_annotations.json",
        vqa / "mscoco2014" / "train2014",
    )


@pytest.fixture(scope="module")
def cache(rl_inputs, tmp_path_factory) -> Path:
    """A sampler cache in the lineage's format for the beam queries (and a query of another run)."""
    queries = load_beam_data(rl_inputs.beam_data, 274).query_ids
    draw = random.Random(3)
    pools = {str(q): draw.sample([r for r in range(274) if r != q], POOL_SIZE) for q in queries}
    pools["273"] = list(range(POOL_SIZE))
    path = tmp_path_factory.mktemp("cache") / "sampler_cache.json"
    path.write_text(json.dumps(pools))
    return path


@pytest.fixture(scope="module")
def reference(rl_inputs, cache, tmp_path_factory) -> Path:
    """One uninterrupted per-query run, scored by the tiny VLM."""
    output = tmp_path_factory.mktemp("per_query") / "rl.json"
    generate_rl_data.main(argv(rl_inputs, output, *per_query(cache)))
    return output


class EchoBackend:
    """Answers each prompt with the file names of its ICD images: the record shows the prompt's items."""

    batch_size = 4

    def prefetch(self, prompts):
        pass

    def generate(self, prompts, replies=None):
        return [Generation.from_raw(" ".join(shot.image.stem for shot in p.shots)) for p in prompts]


def run_echo(rl_inputs, output: Path, *extra: str) -> None:
    run_generation(
        request_from_args(
            generate_rl_data.build_parser().parse_args(argv(rl_inputs, output, *extra, "--proposal_block", "4"))
        ),
        backend=EchoBackend(),
    )


def test_pools_are_the_caches_and_pointers_are_positions_in_them(reference, cache, rl_inputs, tmp_path):
    data, pools = load_rl_data(reference), json.loads(cache.read_text())
    queries = load_beam_data(rl_inputs.beam_data, 274).query_ids[:8]
    assert list(data) == [str(q) for q in queries]
    for key, entry in data.items():
        assert entry["candidate_pool_ids"] == pools[key]
        for c in entry["pointer_candidates"]:
            assert all(0 <= i < POOL_SIZE for i in c["pointer"])
            assert c["pointer_global"] == [pools[key][i] for i in c["pointer"]]
    meta = read_json(reference.with_name("rl.json.meta.json"))
    assert meta["settings"]["pool"]["pool"] == "per_query" and meta["settings"]["pool"]["sampler"] == "cache"
    assert len(meta["settings"]["pool"]["sampler_cache"]) == 64, "the cache's content is in the fingerprint"
    # the validation stage: schema, pools recomputed from the cache, metrics
    dataset_paths = request_from_args(generate_rl_data.build_parser().parse_args(argv(rl_inputs, reference))).dataset
    outputs = ValidationOutputs(tmp_path / "metrics.json", tmp_path / "breakdown.json", tmp_path / "plots")
    report = run_validation(reference, rl_inputs.beam_data, dataset_paths, outputs, sampler_cache=cache)
    assert report.metrics["queries"] == 8
    icds = read_json(tmp_path / "breakdown.json")["icds"]
    used = {i for e in data.values() for c in e["pointer_candidates"] for i in c["pointer_global"]}
    assert icds["distinct_icds"] == len(used), "ICDs are counted as global rows"


def test_prompts_hold_the_global_rows(rl_inputs, cache, tmp_path):
    run_echo(rl_inputs, tmp_path / "rl.json", *per_query(cache))
    data = load_rl_data(tmp_path / "rl.json")
    dataset = _dataset(rl_inputs)
    for entry in data.values():
        for c in entry["pointer_candidates"]:
            assert c["vqa_raw_generation"] == " ".join(dataset.image_path(i).stem for i in c["pointer_global"])


def test_kill_9_then_resume_equals_an_uninterrupted_run(reference, cache, rl_inputs, tmp_path):
    output = tmp_path / "rl.json"
    args = argv(rl_inputs, output, *per_query(cache))  # the reference's batch size (gt_prob's last bits)
    process = subprocess.Popen(
        [sys.executable, "-m", "lever_lm.models.v3.generate_rl_data", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal_lines, deadline = 0, time.time() + 120
    while time.time() < deadline and process.poll() is None:
        journals = list((tmp_path / "rl.json.journal").glob("*/shard-0-of-1.jsonl"))
        journal_lines = journals[0].read_bytes().count(b"\n") if journals else 0
        if journal_lines >= 2:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= journal_lines < 9, "the kill should land mid-run"
    assert not output.exists()
    generate_rl_data.main(argv(rl_inputs, output, *per_query(cache)))
    assert output.read_bytes() == reference.read_bytes()


@pytest.mark.parametrize("sampler", ["cache", "sim"])
def test_sharded_and_merged_equals_a_single_run(sampler, cache, rl_inputs, tmp_path):
    """Shards of 2 blocks each, dealt round-robin (the echo backend: the pools and the layout are under test)."""
    single = tmp_path / "single" / "rl.json"
    run_echo(rl_inputs, single, *per_query(cache, "--sampler", sampler))
    sharded = tmp_path / "sharded" / "rl.json"
    for shard in ("1", "0"):
        run_echo(rl_inputs, sharded, *per_query(cache, "--sampler", sampler, "--num_shards", "2", "--shard_id", shard))
        assert not sharded.exists()
    run_echo(rl_inputs, sharded, *per_query(cache, "--sampler", sampler, "--num_shards", "2", "--merge"))
    assert sharded.read_bytes() == single.read_bytes()


def test_rand_and_sim_samplers_end_to_end(rl_inputs, cache, tmp_path):
    common = ["--pool", "per_query", "--pool_size", "8", "--sampler_cache", str(cache), *LAYOUT]
    run_echo(rl_inputs, tmp_path / "rand.json", *common, "--sampler", "rand", "--exclude_same_image")
    rand = load_rl_data(tmp_path / "rand.json")
    dataset = _dataset(rl_inputs)
    expected = RandomPools(8, 274, 42, ImageGroups(dataset.image_ids, 274))
    for key, entry in rand.items():
        assert entry["candidate_pool_ids"] == list(expected.pools_of([int(key)])[0])
    run_echo(rl_inputs, tmp_path / "sim.json", *common, "--sampler", "sim")
    sim = load_rl_data(tmp_path / "sim.json")
    assert [e["candidate_pool_ids"] for e in sim.values()] != [e["candidate_pool_ids"] for e in rand.values()]
    # the validator recomputes rand pools: a hand-edited pool is caught
    meta = read_meta(tmp_path / "rand.json")
    beam = load_beam_data(rl_inputs.beam_data, 274)
    expectations = expectations_for(dataset, beam.query_ids, meta, None, 1.0)
    validate_rl_data(tmp_path / "rand.json", rand, expectations)
    key = next(iter(rand))
    pool = rand[key]["candidate_pool_ids"]
    pool[0], pool[1] = pool[1], pool[0]
    for c in rand[key]["pointer_candidates"]:
        c["pointer_global"] = [pool[i] for i in c["pointer"]]
    with pytest.raises(InputError, match="not the pool the run's sampler gives this query"):
        validate_rl_data(tmp_path / "rand.json", rand, expectations)


def test_the_fingerprint_follows_the_pools_and_nothing_else(rl_inputs, cache, tmp_path):
    def fingerprint(*extra: str) -> str:
        args = generate_rl_data.build_parser().parse_args(argv(rl_inputs, tmp_path / "rl.json", *extra))
        return plan_run(request_from_args(args)).fingerprint

    plain = fingerprint()
    assert fingerprint("--pool_size", "8", "--sampler", "sim", "--sampler_cache", str(cache)) == plain, (
        "pool settings do not matter with the global pool"
    )
    cached = fingerprint(*per_query(cache))
    edited = tmp_path / "edited.json"
    pools = json.loads(cache.read_text())
    pools["273"] = list(range(1, POOL_SIZE + 1))  # not a query of the run: the file still differs
    edited.write_text(json.dumps(pools))
    assert (
        len({plain, cached, fingerprint(*per_query(edited)), fingerprint(*per_query(cache, "--sampler", "rand"))}) == 4
    )


class NoModel:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the VQA model must not be loaded")


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("missing_query", "the sampler cache has no pool for 1 of the 12 queries"),
        ("query_in_pool", "contains the query itself"),
        ("id_out_of_range", "has ids outside 0..273"),
        ("smaller_than_shot_num", "is smaller than shot_num 2"),
        ("unequal_sizes", "pools of unequal size"),
    ],
)
def test_bad_caches_stop_before_the_model_loads(breakage, expected, rl_inputs, cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lever_lm.rl.generate.load_backend", NoModel)
    monkeypatch.setattr("lever_lm.rl.inputs.load_pointer_checkpoint", NoModel)
    pools = json.loads(cache.read_text())
    first = next(iter(pools))
    size = POOL_SIZE
    if breakage == "missing_query":
        del pools[first]
    elif breakage == "query_in_pool":
        pools[first][3] = int(first)
    elif breakage == "id_out_of_range":
        pools[first][3] = 274
    elif breakage == "smaller_than_shot_num":
        pools, size = {k: v[:1] for k, v in pools.items()}, 1
    else:
        pools[first] = pools[first][:-1]
    broken = tmp_path / "cache.json"
    broken.write_text(json.dumps(pools))
    args = argv(
        rl_inputs, tmp_path / "rl.json", "--pool", "per_query", "--pool_size", str(size), "--sampler_cache", str(broken)
    )
    with pytest.raises(SystemExit) as exit_info:
        generate_rl_data.main(args)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "rl.json").exists() and not (tmp_path / "rl.json.journal").exists()
