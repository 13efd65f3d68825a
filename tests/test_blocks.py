"""The block scorer with a fake VQA backend: chunks cut from the whole block, resume, failures, order."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from lever_lm.models.v3 import generate_rl_data
from lever_lm.models.v3.proposals import Candidate, QueryProposals
from lever_lm.rl.blocks import BlockScorer
from lever_lm.rl.checks import load_rl_data
from lever_lm.rl.cli import request_from_args
from lever_lm.rl.generate import run_generation
from lever_lm.rl.inputs import load_inputs
from lever_lm.vqa.backends.base import Generation

SMALL = ["--num_beams", "2", "--temps", "1.0", "--num_samples_per_temp", "1", "--num_random", "1", "--device", "cpu"]


def argv(rl_inputs, output: Path, *extra: str) -> list[str]:
    return [
        "--sft_ckpt", str(rl_inputs.sft_ckpt), "--beam_data", str(rl_inputs.beam_data),
        "--output_path", str(output), "--query_emb", str(rl_inputs.query_emb), "--cand_emb", str(rl_inputs.cand_emb),
        "--vqa_model_path", str(rl_inputs.vlm), *rl_inputs.dataset_flags(), *SMALL, "--no_progress", *extra,
    ]  # fmt: skip


def request(rl_inputs, output: Path, *extra: str):
    return request_from_args(generate_rl_data.build_parser().parse_args(argv(rl_inputs, output, *extra)))


class RecordingBackend:
    """Answers with the first ICD's image name; remembers every generate call's prompts."""

    def __init__(self, batch_size: int, fail: set[str] = frozenset()):
        self.batch_size = batch_size
        self.fail = set(fail)
        self.calls: list[list[tuple]] = []
        self.prefetched: list[tuple] = []

    def prefetch(self, prompts):
        self.prefetched += [(p.query.image.name, tuple(s.image.name for s in p.shots)) for p in prompts]

    def generate(self, prompts, replies=None):
        self.calls.append([(p.query.image.name, tuple(s.image.name for s in p.shots)) for p in prompts])
        out = []
        for k, p in enumerate(prompts):
            if p.shots and p.shots[0].image.name in self.fail:
                out.append(Generation.failed("generation failed: RuntimeError: boom"))
            else:
                # a made-up likelihood per reply: half the mass spread evenly
                logprobs = None if replies is None else tuple(math.log(0.5 / len(replies[k])) for _ in replies[k])
                out.append(Generation.from_raw(f" {p.shots[0].image.stem[-3:] if p.shots else 'x'}", logprobs))
        return out


@pytest.fixture(scope="module")
def inputs(rl_inputs, tmp_path_factory):
    return load_inputs(request(rl_inputs, tmp_path_factory.mktemp("blocks") / "rl.json"))


def test_chunks_mix_queries_and_results_come_in_block_order(inputs):
    backend = RecordingBackend(batch_size=5)
    scorer = BlockScorer(inputs, backend, "always", "cpu", block_size=12)
    block = inputs.queries
    results = list(scorer.run(block, set(block)))
    assert [r.query_idx for r in results] == block
    sizes = [len(r.entry["pointer_candidates"]) for r in results]
    assert [len(c) for c in backend.calls] == [5] * (sum(sizes) // 5) + ([sum(sizes) % 5] if sum(sizes) % 5 else [])
    assert len({q for q, _ in backend.calls[0]}) > 1 or sizes[0] >= 5, "a chunk holds several queries' candidates"
    flat = [(q, shots) for call in backend.calls for q, shots in call]
    image = inputs.dataset.image_path
    expected = [
        (image(r.query_idx).name, tuple(image(i).name for i in c["pointer"]))
        for r in results
        for c in r.entry["pointer_candidates"]
    ]
    assert flat == expected, "prompts follow the block's candidates, query by query"


def test_a_resumed_block_sends_exactly_the_fresh_runs_chunks_that_hold_work(inputs):
    fresh = RecordingBackend(batch_size=4)
    block = inputs.queries
    fresh_results = list(BlockScorer(inputs, fresh, "always", "cpu", block_size=12).run(block, set(block)))
    done = set(block[:5])  # killed after five queries of the block were journaled
    resumed = RecordingBackend(batch_size=4)
    results = list(BlockScorer(inputs, resumed, "always", "cpu", block_size=12).run(block, set(block) - done))
    assert [r.query_idx for r in results] == block[5:]
    todo_images = {inputs.dataset.image_path(q).name for q in block[5:]}
    assert resumed.calls == [call for call in fresh.calls if any(q in todo_images for q, _ in call)]
    assert resumed.prefetched == [prompt for call in resumed.calls for prompt in call], "images prepared ahead"
    assert len(resumed.calls) < len(fresh.calls)
    assert [r.entry for r in results] == [r.entry for r in fresh_results[5:]]


def test_a_failed_generation_fails_its_candidate_only(inputs):
    clean = list(BlockScorer(inputs, RecordingBackend(4), "always", "cpu", 12).run(inputs.queries, set(inputs.queries)))
    victim = clean[0].entry["pointer_candidates"][0]["pointer"][0]
    bad_image = inputs.dataset.image_path(victim).name
    results = list(
        BlockScorer(inputs, RecordingBackend(4, {bad_image}), "always", "cpu", 12).run(
            inputs.queries, set(inputs.queries)
        )
    )
    for good, got in zip(clean, results):
        for a, b in zip(good.entry["pointer_candidates"], got.entry["pointer_candidates"]):
            if inputs.dataset.image_path(a["pointer"][0]).name == bad_image:
                assert b["eval_failed"] and b["eval_error"] == "generation failed: RuntimeError: boom"
                assert b["vqa_acc_score"] == 0.0 and b["vqa_pred_answer"] == ""
            else:
                assert a == b
    assert not any(r.query_error for r in results), "the query images are fine"


def test_queries_without_candidates_still_come_in_order(inputs):
    scorer = BlockScorer(inputs, RecordingBackend(2), "always", "cpu", 12)
    q0, q1, q2 = inputs.queries[:3]
    candidate = Candidate(pointer=(q2, q0 + 1 if q0 + 1 != q1 else q0 + 2), gen_method="random")
    proposals = [QueryProposals(q0, []), QueryProposals(q1, [candidate]), QueryProposals(q2, [])]
    results = list(scorer.score(proposals, {q0, q1, q2}))
    assert [r.query_idx for r in results] == [q0, q1, q2]
    assert [len(r.entry["pointer_candidates"]) for r in results] == [0, 1, 0]


def test_failed_evaluations_are_retried_by_the_next_run(rl_inputs, tmp_path):
    output = tmp_path / "rl.json"
    run_generation(request(rl_inputs, tmp_path / "ref.json"), backend=RecordingBackend(batch_size=4))
    reference = load_rl_data(tmp_path / "ref.json")
    first_icd = next(iter(reference.values()))["pointer_candidates"][0]["pointer"][0]
    inputs = load_inputs(request(rl_inputs, output))
    flaky = RecordingBackend(batch_size=4, fail={inputs.dataset.image_path(first_icd).name})
    summary = run_generation(request(rl_inputs, output), backend=flaky)
    failed = sum(c["eval_failed"] for e in load_rl_data(output).values() for c in e["pointer_candidates"])
    assert failed > 0 and summary.final["failed"] == failed
    summary = run_generation(request(rl_inputs, output), backend=RecordingBackend(batch_size=4))
    assert summary.queries_retried > 0
    assert load_rl_data(output) == reference, "the retry's answers replace the failed ones"
    again = run_generation(request(rl_inputs, output), backend=RecordingBackend(batch_size=4))
    assert again.queries_retried == 0 and again.queries_processed == 0


def test_a_query_whose_own_image_is_unreadable_is_left_out_and_reported(rl_inputs, tmp_path):
    images = shutil.copytree(rl_inputs.vqa / "mscoco2014" / "train2014", tmp_path / "train2014")
    inputs = load_inputs(request(rl_inputs, tmp_path / "x.json"))
    victim = inputs.queries[1]
    path = images / inputs.dataset.image_path(victim).name
    path.write_bytes(path.read_bytes()[:100])  # truncated
    args = ["--train_image_root", str(images)]

    class FailsOnBrokenImages(RecordingBackend):
        def generate(self, prompts, replies=None):
            out = super().generate(prompts, replies)
            return [Generation.failed("cannot read image") if path in p.images else g for p, g in zip(prompts, out)]

    summary = run_generation(request(rl_inputs, tmp_path / "rl.json", *args), backend=FailsOnBrokenImages(4))
    data = load_rl_data(tmp_path / "rl.json")
    assert str(victim) not in data and len(data) == len(inputs.queries) - 1
    assert "the query's image cannot be read" in summary.final["unscorable_queries"][str(victim)]
