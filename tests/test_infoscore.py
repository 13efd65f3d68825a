"""InfoScore beam data (stage `beam_data`): the search, InfoScore through the backends against a
brute-force reference, and the job (journal, resume after kill -9, shards, the lineage's reader).

The references are independent of the code under test: InfoScore from one uncached forward pass
per prompt over the whole conversation (the processor or the tokenizer builds it), the lineage's
"last" ranking from its `generate_single_sample_icd` + `beam_filter`, and its SFT trainer's reading
of a beam file from `train.py` / `data_split` / `LeverLMDataset` / `collate_fn`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lever_lm.data.beam_data import load_beam_data
from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.vqa import VQADataset
from lever_lm.demo.dataset import Split
from lever_lm.errors import InputError
from lever_lm.infoscore import cli
from lever_lm.infoscore.generate import BeamDataRequest, BeamInputs, BeamSearcher, plan_beam_data, run_beam_data
from lever_lm.infoscore.records import BeamRules
from lever_lm.infoscore.search import SearchSettings, info_score_search
from lever_lm.models.v3.pools import save_sampler_cache
from lever_lm.models.v3.samplers import draw_queries, sample_pools
from lever_lm.rl.journal import Journal, JournalSpec, record_line
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.shared_prefix import images_in_prefix, prefix_first, shared_prefix_length
from lever_lm.vqa.flamingo.loading import clip_pixels
from lever_lm.vqa.images import read_rgb
from lever_lm.vqa.prompts import build_prompt, chat_messages, flamingo_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- the search, with stand-in probabilities -----------------------------------------------------------


class SharedAnswers:
    """A stand-in for P: 0.2 + 0.3 per ICD with the query's answer, + a small order-free tie-breaker."""

    def __init__(self, answers: Sequence[str], query: int):
        self.answers, self.query, self.calls = answers, query, []

    def p(self, icds: Sequence[int]) -> float:
        helpful = sum(self.answers[i] == self.answers[self.query] for i in icds)
        return 0.2 + 0.3 * helpful + 0.001 * sum(icds) / len(self.answers)

    def __call__(self, sequences):
        self.calls.append([tuple(s) for s in sequences])
        return [self.p(s) for s in sequences]


ANSWERS = ["red", "blue", "red", "green", "red", "blue", "green", "blue", "red", "green"]


def test_icds_that_share_the_answer_gain_most_and_scores_are_infoscores():
    probability = SharedAnswers(ANSWERS, query=0)
    result = info_score_search(probability, range(1, 10), SearchSettings(shot_num=2, beam_size=3))
    best = result.beams[0]
    assert best.icds == (8, 4) and best.picks == (8, 4)  # the two highest "red" items, in pick order
    for beam in result.beams:  # InfoScore of each step: P(S + [c]) - P(S)
        assert beam.gains == pytest.approx((probability.p(beam.picks[:1]) - probability.p(()),
                                            probability.p(beam.picks) - probability.p(beam.picks[:1])))  # fmt: skip
        assert sum(beam.gains) == pytest.approx(beam.probability - result.base_probability)
    assert result.prompts == 1 + 9 + 3 * 8 and result.failed == 0
    assert len(probability.calls) == 2, "every expansion of a step in one call"
    assert probability.calls[0][0] == (), "P of no ICD is scored with the first step"


def test_sum_ranking_with_a_beam_as_wide_as_the_pool_finds_the_best_sequence():
    table = torch.rand(12, 12, generator=torch.Generator().manual_seed(3))

    def probability(sequences):  # depends on the order of the ICDs
        return [0.0 if not s else float(table[s[0], s[-1]]) + 0.01 * len(s) for s in sequences]

    pool = [1, 3, 4, 6, 9, 11]
    result = info_score_search(probability, pool, SearchSettings(shot_num=2, beam_size=len(pool)))
    pairs = sorted(itertools.permutations(pool, 2), key=lambda s: -float(table[s[0], s[1]]))
    assert result.beams[0].icds == pairs[0]
    totals = [float(table[a, b]) for a, b in (beam.icds for beam in result.beams)]
    assert totals == sorted(totals, reverse=True)


def lineage_last_step_search(probability, pool, shot_num, beam_size):
    """Lever-LM's `generate_single_sample_icd` with InfoScore, written from its code: per beam, the
    InfoScore of every candidate not in it, its top `beam_size`; then `beam_filter`: the global top
    `beam_size` of those by score. New ICDs are prepended (construct_order left)."""
    beams, scores = [[]], []
    for _ in range(shot_num):
        new_beams, new_scores = [], []
        for beam in beams:
            base = probability([beam])[0]
            candidates = [c for c in sorted(pool) if c not in beam]
            gains = torch.tensor(probability([[c, *beam] for c in candidates])) - base
            top, index = gains.topk(beam_size)
            new_beams += [[candidates[i], *beam] for i in index.tolist()]
            new_scores += top.tolist()
        kept, order = torch.tensor(new_scores).topk(beam_size)
        beams, scores = [new_beams[i] for i in order.tolist()], kept.tolist()
    return beams, scores


def test_last_step_ranking_and_left_order_are_the_lineages_search():
    table = torch.rand(12, 12, generator=torch.Generator().manual_seed(5)).double()

    def probability(sequences):  # P depends on the first and the last ICD: order matters
        return [0.5 if not s else float(table[s[0], s[-1]] + 0.1 * table[s[-1], s[0]]) for s in sequences]

    pool = [0, 2, 3, 5, 7, 8, 10]
    settings = SearchSettings(shot_num=2, beam_size=4, ranking="last", construct_order="left")
    result = info_score_search(probability, pool, settings)
    beams, scores = lineage_last_step_search(probability, pool, 2, 4)
    assert [list(beam.icds) for beam in result.beams] == beams
    assert [beam.gains[-1] for beam in result.beams] == pytest.approx(scores)
    assert all(beam.icds == beam.picks[::-1] for beam in result.beams), "left: the last pick comes first"


def test_ties_break_toward_the_lower_beam_then_the_lower_id_and_failures_are_never_kept():
    result = info_score_search(lambda seqs: [0.5] * len(seqs), [0, 1, 3, 4], SearchSettings(beam_size=4))
    assert [beam.icds for beam in result.beams] == [(0, 1), (0, 3), (0, 4), (1, 0)]
    failing = info_score_search(
        lambda seqs: [None if 0 in s else 0.5 for s in seqs], [0, 1, 3], SearchSettings(beam_size=4)
    )
    assert [beam.icds for beam in failing.beams] == [(1, 3), (3, 1)] and failing.failed == 1 + 2
    nothing = info_score_search(lambda seqs: [None] * len(seqs), [0, 1], SearchSettings())
    assert nothing.beams == [] and nothing.base_probability is None and nothing.prompts == 3


@pytest.mark.parametrize(
    "settings, problem",
    [
        (dict(shot_num=0), "--shot_num must be >= 1"),
        (dict(beam_size=0), "--beam_size must be >= 1"),
        (dict(ranking="best"), "--ranking must be one of sum, last"),
        (dict(construct_order="middle"), "--construct_order must be one of right, left"),
    ],
)
def test_impossible_settings_are_refused(settings, problem):
    with pytest.raises(InputError, match=problem):
        SearchSettings(**settings)


# -- InfoScore through the backends, against a brute-force reference ------------------------------------


@pytest.fixture(scope="module")
def split(demo_dir) -> Split:
    return Split("train", demo_dir / "vqa")


@pytest.fixture(scope="module")
def dataset(split) -> VQADataset:
    return VQADataset.load(split.questions_path, split.annotations_path, split.image_root)


def qwen_reference(backend, prompt, answer: str) -> float:
    """P(answer | prompt): one uncached forward pass over the conversation the processor renders; the
    geometric mean of the probabilities of the answer's tokens and the end-of-turn token."""
    processor = backend.processor
    messages = chat_messages(prompt, backend.settings.prompt)
    assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
    prompt_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = processor.apply_chat_template([*messages, assistant], tokenize=False)
    images = [read_rgb(path) for path in prompt.images]
    n = len(processor(text=[prompt_text], images=[images], return_tensors="pt")["input_ids"][0])
    full = processor(text=[full_text], images=[images], return_tensors="pt")
    ids = full["input_ids"][0]
    end = n + ids[n:].tolist().index(backend.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    with torch.inference_mode():
        logits = backend.model(**full, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits[n - 1 : end], dim=-1).gather(-1, ids[n : end + 1, None])
    return math.exp(float(logprobs.mean()))


def flamingo_reference(backend, prompt, answer: str) -> float:
    """P(answer | prompt) for OpenFlamingo: the prompt text, then the answer and `<|endofchunk|>`, tokenized
    as one text; the model on it alone (no padding, no cache)."""
    text = flamingo_text(prompt, backend.settings.prompt)
    prompt_ids = backend.tokenizer(text)["input_ids"]
    ids = backend.tokenizer(text + answer + "<|endofchunk|>")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids, "the answer's tokens follow the prompt's"
    with torch.inference_mode():
        pixels = torch.stack([clip_pixels(read_rgb(path), backend.image_size) for path in prompt.images])
        media = backend.model.encode_images(pixels)[None]
        ids_t = torch.tensor([ids])
        logits = backend.model(
            ids_t, torch.ones_like(ids_t), media, torch.ones(1, len(prompt.images), dtype=torch.bool)
        )
    n = len(prompt_ids)
    logprobs = torch.log_softmax(logits[0, n - 1 : -1].float(), dim=-1).gather(-1, ids_t[0, n:, None])
    return math.exp(float(logprobs.mean()))


@pytest.mark.parametrize(
    "name, model, reference",
    [("qwen2.5_vl_3B", "qwen2.5-vl-tiny", qwen_reference), ("flamingo_3B", "openflamingo-tiny", flamingo_reference)],
)
@pytest.mark.parametrize("construct_order", ["right", "left"])
def test_infoscore_equals_a_brute_force_unbatched_computation(
    name, model, reference, construct_order, demo_dir, dataset
):
    """The search through the backend (every expansion of a step in batches, the common prefix run
    once) keeps the beams a search on brute-force probabilities keeps, with the same InfoScores."""
    backend = load_backend(name, model_path=str(demo_dir / "models" / model), device="cpu", batch_size=4)
    query, pool = 7, (3, 40, 12, 25, 61)
    settings = SearchSettings(shot_num=2, beam_size=3, construct_order=construct_order)
    searcher = BeamSearcher(BeamInputs(dataset, {query: pool}, [query], [query]), backend, settings)
    entry = searcher.search(query).entry

    answer = dataset[query].icd_answer
    cache: dict[tuple[int, ...], float] = {}

    def brute_force(sequences):
        for icds in map(tuple, sequences):
            if icds not in cache:
                cache[icds] = reference(backend, build_prompt(dataset, query, icds), answer)
        return [cache[tuple(s)] for s in sequences]

    expected = info_score_search(brute_force, pool, settings)
    assert entry["id_list"] == [[*beam.icds, query] for beam in expected.beams]
    scale = max(cache.values())  # InfoScores are differences of probabilities of this size
    for gains, beam in zip(entry["shot_scores"], expected.beams):
        assert gains == pytest.approx(beam.gains, abs=1e-4 * scale)
    assert entry["score_list"] == [gains[-1] for gains in entry["shot_scores"]]


def test_a_shared_prefix_scores_what_plain_batches_score(demo_dir, dataset, monkeypatch):
    """Qwen2.5-VL runs a batch's common prefix (system turn and the ICDs a beam holds, images
    included) once: the scores equal the plain prefill's, one prompt at a time, and what
    generation's cache gives."""
    backend = load_backend("qwen2.5_vl_3B", model_path=str(demo_dir / "models" / "qwen2.5-vl-tiny"), batch_size=8)
    shared_images = []
    prefix_prefill = type(backend)._prefix_prefill

    def spy(self, inputs, image_counts, length):
        shared_images.append(images_in_prefix(inputs["mm_token_type_ids"][0], length))
        return prefix_prefill(self, inputs, image_counts, length)

    monkeypatch.setattr(type(backend), "_prefix_prefill", spy)
    answer = dataset[7].icd_answer
    batches = [
        [build_prompt(dataset, 7, [3, c]) for c in (40, 12, 25, 61)],  # one beam's expansions: ICD 3 is shared
        [build_prompt(dataset, 7, icds) for icds in ([], [3], [40, 3])],  # only the system turn is
    ]
    for prompts in batches:
        replies = [(answer, "two words")] * len(prompts)
        backend.share_prefix = True
        shared = backend.score_replies(prompts, replies)
        backend.share_prefix = False
        plain = backend.score_replies(prompts, replies)
        alone = [backend.score_replies([p], [r])[0] for p, r in zip(prompts, replies)]
        generated = backend.generate(prompts, replies)
        for a, b, c, g in zip(shared, plain, alone, generated):
            assert a.error is None and a.token_counts == b.token_counts
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            assert a.logprobs == pytest.approx(c.logprobs, abs=1e-5)
            assert a.logprobs == pytest.approx(g.reply_logprobs, abs=1e-5)
    assert shared_images == [1, 0], "the first batch ran ICD 3's image once, the second only the system turn"


def test_the_shared_prefix_ends_before_an_image_that_differs_or_is_cut_and_moves_to_the_front():
    pad, img = 0, 9
    ids = torch.tensor([[1, 2, img, img, 3, 4, img, 5], [pad, 1, 2, img, img, 3, 4, 6]])
    mask = (ids != pad).long()
    mask[0, 0] = 1
    is_image = ids == img
    same = [["a", "b"], ["a"]]
    assert shared_prefix_length(ids, mask, is_image, same) == 6  # 1 2 [a] 3 4: every row keeps its last token
    assert shared_prefix_length(ids, mask, is_image, [["a", "b"], ["z"]]) == 2, "another picture: cut before it"
    split = torch.tensor([[1, img, img, 5], [1, img, img, 6]])  # the prefix would end inside the image
    assert shared_prefix_length(split, torch.ones_like(split), split == img, [["a"], ["a"]]) == 3
    assert shared_prefix_length(split[:, :2], torch.ones_like(split[:, :2]), split[:, :2] == img, [["a"], ["a"]]) == 1
    moved = prefix_first({"input_ids": ids, "attention_mask": mask}, ("input_ids", "attention_mask"), 3)
    assert moved["input_ids"].tolist() == [[1, 2, img, img, 3, 4, img, 5], [1, 2, img, pad, img, 3, 4, 6]]
    assert moved["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 0, 1, 1, 1, 1]]


# -- the job --------------------------------------------------------------------------------------------


def _flags(split: Split) -> list[str]:
    return [
        "--train_ques_path", str(split.questions_path),
        "--train_ann_path", str(split.annotations_path),
        "--train_image_root", str(split.image_root),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pools_file(dataset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pools") / "pools.json"
    save_sampler_cache(sample_pools("rand", draw_queries(len(dataset), 6, seed=1), dataset.image_ids, 6), path)
    return path


def _argv(split, demo_dir, pools_file, out: Path, *extra: str) -> list[str]:
    return [
        *_flags(split), "--sampler_cache", str(pools_file), "--output_path", str(out),
        "--vqa_model_path", str(demo_dir / "models" / "qwen2.5-vl-tiny"), "--device", "cpu",
        "--beam_size", "3", "--batch_size", "8", "--no_progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(split, demo_dir, pools_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("beam") / "beam.json"
    cli.main(_argv(split, demo_dir, pools_file, out))
    return out


def lineage_sft_read(path: Path, num_items: int, train_ratio: float = 0.9, threshold: float = 0.0) -> dict:
    """What Lever-LM's SFT trainer makes of a beam file, following its code (train.py
    `ICDSeqDataModule`, lever_lm/utils.py `data_split`, `BaseLeverLMDataset`, `collate_fn`):
    `json.load`; queries = the last id of every `id_list` entry, the first `int(0.9 * n)` of them in
    sorted order train, the rest validation; entry i goes with `score_list[i]`; a score below the
    threshold drops the sequence; a sequence is [BOS, QUERY, icd_1..icd_k, EOS] with EOS = N,
    BOS = N + 1, QUERY = N + 2, every id a row of the training split; a batch is `torch.stack`ed."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    queries = {v[-1] for d in data for v in data[d]["id_list"]}
    train = set(sorted(queries)[: int(train_ratio * len(queries))])
    splits: dict[str, list] = {"train": [], "val": []}
    for d in data:
        for i in range(len(data[d]["id_list"])):
            ids, score = data[d]["id_list"][i], data[d]["score_list"][i]
            name = "train" if int(ids[-1]) in train else "val" if int(ids[-1]) in queries - train else None
            assert name is not None
            if score < threshold:
                continue
            assert all(0 <= i < num_items for i in ids), "the trainer indexes the training split with every id"
            splits[name].append(torch.tensor([num_items + 1, num_items + 2, *ids[:-1], num_items]))
    return {name: torch.stack(rows) for name, rows in splits.items() if rows}


def test_the_beam_file_loads_here_and_in_the_lineages_trainer(reference_run, dataset, pools_file):
    beam = load_beam_data(reference_run, len(dataset))
    pools = json.loads(pools_file.read_text())
    assert [str(q) for q in beam.query_ids] == list(pools) and beam.shot_num == 2
    data = json.loads(reference_run.read_text())
    for key, entry in data.items():
        assert len(entry["id_list"]) == 3
        for ids in entry["id_list"]:
            assert set(ids[:-1]) <= set(pools[key]) and int(key) not in ids[:-1]
        assert entry["score_list"] == [gains[-1] for gains in entry["shot_scores"]]
    read = lineage_sft_read(reference_run, len(dataset), train_ratio=0.5, threshold=-1.0)
    assert read["train"].shape == (9, 5) and read["val"].shape == (9, 5)
    meta = json.loads(reference_run.with_name("beam.json.meta.json").read_text())
    assert meta["counts"]["queries"] == 6 and meta["counts"]["prompts"] == 6 * (1 + 6 + 3 * 5)
    assert meta["settings"]["search"] == {"shot_num": 2, "beam_size": 3, "ranking": "sum", "construct_order": "right"}


def test_a_run_killed_mid_way_resumes_to_the_same_bytes(split, demo_dir, pools_file, tmp_path):
    """Killed with SIGKILL after a few queries (the journal's last line torn), then resumed with another
    batch size: the bytes of an uninterrupted run at the pinned batch size and thread count (1)."""
    uninterrupted = tmp_path / "whole" / "beam.json"
    cli.main(_argv(split, demo_dir, pools_file, uninterrupted, "--batch_size", "2"))
    out = tmp_path / "beam.json"
    argv = [
        sys.executable,
        "-m",
        "lever_lm.infoscore.cli",
        *_argv(split, demo_dir, pools_file, out, "--batch_size", "2"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the torch threads this module's runs use (one_torch_thread)
    process = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    journal, lines, deadline = None, 0, time.time() + 240
    while time.time() < deadline and process.poll() is None and lines < 3:
        journal = next(iter((tmp_path / "beam.json.journal").glob("*/shard-0-of-1.jsonl")), None)
        lines = journal.read_bytes().count(b"\n") if journal else 0  # the header, then one line per query
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 3 <= lines < 7 and not out.exists(), "the kill should land mid-run"
    with journal.open("ab") as handle:
        handle.write(b'{"query_idx": 1, "attem')  # a torn last line, as a kill mid-write leaves
    cli.main(_argv(split, demo_dir, pools_file, out))  # --batch_size 8: the journal's pinned 2 wins
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert json.loads(journal.read_bytes().splitlines()[0])["pinned"]["batch_size"] == 2
    assert json.loads(out.with_name("beam.json.meta.json").read_text())["run"]["batch_size"] == 2


def test_shards_and_a_limit_write_what_one_run_writes(split, demo_dir, pools_file, reference_run, tmp_path, dataset):
    out = tmp_path / "beam.json"
    for shard in ("0", "1"):
        cli.main(_argv(split, demo_dir, pools_file, out, "--num_shards", "2", "--shard_id", shard))
    assert not out.exists()
    cli.main(_argv(split, demo_dir, pools_file, out, "--num_shards", "2", "--merge"))
    assert out.read_bytes() == reference_run.read_bytes()
    cli.main(_argv(split, demo_dir, pools_file, tmp_path / "four.json", "--limit", "4"))
    four = json.loads((tmp_path / "four.json").read_text())
    assert four == dict(itertools.islice(json.loads(reference_run.read_text()).items(), 4))


def test_a_corrupt_line_is_refused_and_a_changed_setting_starts_a_new_journal(
    split, demo_dir, pools_file, tmp_path, capsys
):
    out = tmp_path / "beam.json"
    cli.main(_argv(split, demo_dir, pools_file, out, "--limit", "2"))
    journal = next((tmp_path / "beam.json.journal").glob("*/shard-0-of-1.jsonl"))
    header, first, *rest = journal.read_bytes().splitlines(keepends=True)
    record = json.loads(first)
    del record["sha256"]
    record["entry"]["id_list"][0][0] = record["query_idx"]  # the query as its own ICD, checksum made anew
    binding = JournalSpec.from_header(json.loads(header)).binding  # the checksum names the run and shard
    journal.write_bytes(header + (record_line(record, binding) + "\n").encode() + b"".join(rest))
    with pytest.raises(SystemExit) as exit_:
        cli.main(_argv(split, demo_dir, pools_file, out, "--limit", "2"))
    assert exit_.value.code == 2 and "contains the query itself as an ICD" in capsys.readouterr().err
    cli.main(_argv(split, demo_dir, pools_file, out, "--limit", "2", "--ranking", "last"))
    assert len(list((tmp_path / "beam.json.journal").iterdir())) == 2, "the ranking is part of the fingerprint"


def test_bad_inputs_stop_before_any_model_is_loaded(split, dataset, tmp_path, capsys):
    query = draw_queries(len(dataset), 1, seed=0)[0]
    cases = {
        "own.json": ({str(query): [query, 1, 2]}, "contains the query itself"),
        "short.json": ({str(query): [5]}, "fewer than --shot_num 2"),
        "key.json": ({"x1": [1, 2]}, "key 'x1' is not a row"),
    }
    for name, (cache, problem) in cases.items():
        (tmp_path / name).write_text(json.dumps(cache))
        argv = [*_flags(split), "--sampler_cache", str(tmp_path / name), "--output_path", str(tmp_path / "b.json"),
                "--vqa_model_path", str(tmp_path / "no-model"), "--device", "cpu"]  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2 and problem in capsys.readouterr().err, name
    assert not (tmp_path / "b.json").exists()


def test_beam_rules_check_every_field():
    rules = BeamRules(shot_num=2, num_items=50, beam_size=3)
    good = {"id_list": [[1, 2, 9], [2, 1, 9]], "score_list": [0.1, -0.2], "shot_scores": [[0.3, 0.1], [0.0, -0.2]]}
    stats = {"prompts": 10, "failed_prompts": 0, "answer": "red"}
    assert list(rules.problems(9, good, stats)) == []
    broken = [
        ({**good, "id_list": [[1, 2, 8], [2, 1, 9]]}, "the last id must be the query 9"),
        ({**good, "id_list": [[1, 1, 9], [2, 1, 9]]}, "repeats an ICD"),
        ({**good, "id_list": [[1, 99, 9], [2, 1, 9]]}, "ids must be rows 0..49"),
        ({**good, "score_list": [0.3, -0.2]}, "the last step's InfoScore"),
        ({**good, "shot_scores": [[0.3], [0.0, -0.2]]}, "must hold 2 finite numbers"),
        ({**good, "id_list": [[1, 2, 9], [1, 2, 9]]}, "appears twice"),
        ({key: value for key, value in good.items() if key != "shot_scores"}, "exactly 'id_list'"),
    ]
    for entry, problem in broken:
        assert any(problem in p for p in rules.problems(9, entry, stats)), problem
    assert any("stats.prompts" in p for p in rules.problems(9, good, {"failed_prompts": 0}))
    assert rules.needs_retry(good, {**stats, "failed_prompts": 1}) and not rules.needs_retry(good, stats)
    assert BeamRules.from_header(rules.header()) == rules
    spec = JournalSpec({"s": 1}, (9,), rules)
    assert JournalSpec.from_header(spec.header()) == spec


def test_a_journal_of_beam_records_resumes(tmp_path):
    rules = BeamRules(shot_num=1, num_items=10, beam_size=2)
    spec = JournalSpec({"job": "x"}, (3, 4), rules)
    entry = {"id_list": [[1, 3]], "score_list": [0.5], "shot_scores": [[0.5]]}
    with Journal.open(tmp_path, spec) as journal:
        journal.append(3, entry, {"prompts": 3, "failed_prompts": 1, "answer": "a", "first_failure": "x"})
        journal.append(4, {**entry, "id_list": [[1, 4]]}, {"prompts": 3, "failed_prompts": 0, "answer": "a"})
    with Journal.open(tmp_path, spec) as journal:
        assert journal.done() == {4} and journal.incomplete() == {3}, "a query that lost prompts is retried"


def test_requests_are_checked_before_reading(tmp_path, split):
    paths = DatasetPaths(split.questions_path, split.annotations_path, split.image_root)
    with pytest.raises(InputError, match="--shard_id must be in 0..1"):
        run_beam_data(BeamDataRequest(sampler_cache=tmp_path / "p.json", output_path=tmp_path / "b.json",
                                      dataset=paths, num_shards=2, shard_id=2))  # fmt: skip


def test_an_output_name_too_long_for_the_file_system_stops_before_anything_is_read(tmp_path, split, capsys):
    output = tmp_path / ("x" * 235 + ".json")
    argv = [*_flags(split), "--sampler_cache", str(tmp_path / "absent.json"), "--output_path", str(output),
            "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "(240 characters) is too long for this file system" in err, "checked before the missing sampler cache"
    assert list(tmp_path.iterdir()) == []


def test_the_fingerprint_holds_what_shapes_likelihoods_and_not_decoding(split, demo_dir, pools_file):
    paths = DatasetPaths(split.questions_path, split.annotations_path, split.image_root)
    model = str(demo_dir / "models" / "qwen2.5-vl-tiny")

    def fingerprint(config: dict, **search) -> str:
        request = BeamDataRequest(sampler_cache=pools_file, output_path=Path("b.json"), dataset=paths,
                                  vqa_model_path=model, device="cpu", config=config, search=SearchSettings(**search))  # fmt: skip
        return plan_beam_data(request).fingerprint

    plain = fingerprint({})
    assert fingerprint({"vqa_model": {"generation": {"max_new_tokens": 9, "num_beams": 1}}}) == plain
    assert fingerprint({"vqa_model": {"system_prompt": "Answer briefly."}}) != plain
    assert fingerprint({}, beam_size=4) != plain and fingerprint({}, construct_order="left") != plain


def test_unreadable_images_fail_their_prompts_and_a_query_without_its_own_image_is_left_out(
    split, demo_dir, dataset, tmp_path, caplog
):
    vqa = tmp_path / "vqa"
    shutil.copytree(split.image_root.parent.parent, vqa)
    copy = Split("train", vqa)
    image_ids = dataset.image_ids
    by_image: dict[int, list[int]] = {}
    for row, image in enumerate(image_ids):
        by_image.setdefault(image, []).append(row)
    images = list(by_image)
    broken_icd, broken_query = by_image[images[0]][0], by_image[images[1]][0]
    fine = [by_image[image][0] for image in images[2:10]]
    for row in (broken_icd, broken_query):
        copy.image_path(image_ids[row]).write_bytes(b"not an image")
    query = fine[0]
    pools = {str(query): [broken_icd, *fine[1:4]], str(broken_query): fine[4:8]}
    (tmp_path / "pools.json").write_text(json.dumps(pools))
    argv = [*_flags(copy), "--sampler_cache", str(tmp_path / "pools.json"), "--output_path", str(tmp_path / "b.json"),
            "--vqa_model_path", str(demo_dir / "models" / "qwen2.5-vl-tiny"), "--device", "cpu", "--beam_size", "2",
            "--no_progress"]  # fmt: skip
    with caplog.at_level("WARNING"):
        cli.main(argv)
    data = json.loads((tmp_path / "b.json").read_text())
    assert list(data) == [str(query)], "the query whose own image cannot be read is left out"
    assert all(broken_icd not in ids for ids in data[str(query)]["id_list"]) and len(data[str(query)]["id_list"]) == 2
    meta = json.loads((tmp_path / "b.json.meta.json").read_text())
    assert meta["counts"]["failed_prompts"] == 1 + 2 and str(broken_query) in meta["counts"]["unscorable_queries"]
    assert f"query {broken_query} is left out of the output" in caplog.text
    cli.main(argv)  # both are retried: the rerun finds them incomplete
    journal = next((tmp_path / "b.json.journal").glob("*/shard-0-of-1.jsonl"))
    attempts = [json.loads(line)["attempt"] for line in journal.read_bytes().splitlines()[1:]]
    assert sorted(attempts) == [0, 0, 1, 1]
