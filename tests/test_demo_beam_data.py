"""The demo's beam data: a beam search by InfoScore over a random candidate pool per query, deterministic."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import pytest
import torch

from lever_lm.data.beam_data import load_beam_data
from lever_lm.data.vqa import VQADataset
from lever_lm.demo import beam_data
from lever_lm.demo.beam_data import VLMAnswerProbability, build_demo_beam_data, info_score_beam_search
from lever_lm.demo.dataset import Split
from lever_lm.demo.train_vlm import answer_loss, training_prompt
from lever_lm.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SharedAnswers:
    """A stand-in VLM: p(S) = 0.2 + 0.3 per ICD of S with the query's answer (+ a small order-free tie-breaker)."""

    def __init__(self, answers: Sequence[str]):
        self.answers = answers
        self.seen: dict[int, set[int]] = {}

    def p(self, query: int, icds: Sequence[int]) -> float:
        helpful = sum(self.answers[i] == self.answers[query] for i in icds)
        return 0.2 + 0.3 * helpful + 0.001 * sum(icds) / len(self.answers)

    def __call__(self, query: int, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        self.seen.setdefault(query, set()).update(i for icds in sequences for i in icds)
        return torch.tensor([self.p(query, icds) for icds in sequences], dtype=torch.float64)


ANSWERS = ["red", "blue", "red", "green", "red", "blue", "green", "blue", "red", "green"]


def test_icds_that_share_the_answer_gain_most_and_scores_are_the_last_steps_infoscore():
    probability = SharedAnswers(ANSWERS)
    beams, scores = info_score_beam_search(probability, query=0, pool=range(1, 10), shot_num=2, beam_size=3)
    # the best beam holds the two highest "red" items (the tie-breaker favours higher ids), in pick order
    assert beams[0] == [8, 4]
    assert all(ANSWERS[i] == "red" for i in beams[0])
    for beam, score in zip(beams, scores):  # InfoScore of the last step: p(S + [c]) - p(S)
        assert score == pytest.approx(probability.p(0, beam) - probability.p(0, beam[:-1]))
    assert scores[0] == pytest.approx(0.3 + 0.001 * 4 / 10)


def test_beams_are_ranked_by_summed_infoscore_and_match_an_exhaustive_search():
    table = torch.rand(12, 12, generator=torch.Generator().manual_seed(3))

    def probability(query, sequences):  # p depends on the order of the ICDs
        return torch.tensor([0.0 if not s else float(table[s[0], s[-1]]) + 0.01 * len(s) for s in sequences])

    pool = [1, 3, 4, 6, 9, 11]
    beams, _ = info_score_beam_search(probability, query=0, pool=pool, shot_num=2, beam_size=len(pool))
    pairs = sorted(itertools.permutations(pool, 2), key=lambda s: -float(table[s[0], s[1]]))
    assert beams[0] == list(pairs[0])  # a beam as wide as the pool keeps every first pick: search is exact
    totals = [float(table[a, b]) for a, b in beams]
    assert totals == sorted(totals, reverse=True)


def test_ties_break_toward_the_lower_beam_then_the_lower_id():
    def flat(query, sequences):
        return torch.full((len(sequences),), 0.5)

    beams, scores = info_score_beam_search(flat, query=2, pool=[0, 1, 3, 4], shot_num=2, beam_size=4)
    assert beams == [[0, 1], [0, 3], [0, 4], [1, 0]]
    assert scores == [0.0, 0.0, 0.0, 0.0]


def test_queries_pools_and_format_are_deterministic():
    num_items = len(ANSWERS) * 3
    answers = ANSWERS * 3
    probability = SharedAnswers(answers)
    data = build_demo_beam_data(num_items, probability, num_queries=6, candidate_num=8, shot_num=2, beam_size=5, seed=0)
    assert build_demo_beam_data(num_items, SharedAnswers(answers), 6, 8, 2, 5, seed=0) == data
    assert list(build_demo_beam_data(num_items, SharedAnswers(answers), 6, 8, 2, 5, seed=1)) != list(data)
    queries = [int(q) for q in data]
    assert queries == sorted(queries) and len(set(queries)) == 6
    for query in queries:
        pool = probability.seen[query]  # every candidate the search scored
        assert len(pool) == 8 and query not in pool
        entry = data[str(query)]
        assert len(entry["id_list"]) == len(entry["score_list"]) == 5
        assert len({tuple(ids) for ids in entry["id_list"]}) == 5
        for ids in entry["id_list"]:
            assert ids[-1] == query and len(set(ids[:-1])) == 2 and set(ids[:-1]) <= pool


@pytest.mark.parametrize(
    "settings, problem",
    [
        (dict(num_queries=0), "num_queries must be in 1..30"),
        (dict(candidate_num=1), "shot_num must be in 1..min"),
        (dict(shot_num=0), "shot_num must be in 1..min"),
        (dict(beam_size=0), "beam_size must be at least 1"),
    ],
)
def test_impossible_settings_are_refused(settings, problem):
    kwargs = dict(num_queries=4, candidate_num=8, shot_num=2, beam_size=5) | settings
    with pytest.raises(InputError, match=problem):
        build_demo_beam_data(30, SharedAnswers(ANSWERS * 3), **kwargs)


# -- the VLM's answer probability --------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_set(demo_dir) -> VQADataset:
    split = Split("train", demo_dir / "vqa")
    return VQADataset.load(split.questions_path, split.annotations_path, split.image_root)


@pytest.fixture(scope="module")
def tiny_vlm(demo_dir, train_set) -> VLMAnswerProbability:
    return VLMAnswerProbability.load(demo_dir / "models" / "qwen2.5-vl-tiny", train_set, batch_size=3)


def test_answer_probability_is_the_teacher_forced_probability_of_the_querys_answer(tiny_vlm, train_set):
    sequences = [[], [5], [7, 9], [11, 2, 30], [1]]  # rows of different lengths, in batches of 3
    batched = tiny_vlm(4, sequences)
    for icds, p in zip(sequences, batched.tolist()):
        prompt = training_prompt(train_set, 4, icds)
        batch = tiny_vlm.encoder.encode([prompt], [train_set[4].icd_answer])  # labels: the answer and <|im_end|>
        with torch.no_grad():
            reference = torch.exp(-answer_loss(tiny_vlm.model, batch))  # the model's own full forward pass
        assert p == pytest.approx(float(reference), rel=1e-4)
    assert 0 < batched.min() and batched.max() < 1


def test_cli_writes_the_beam_data_the_library_builds(tiny_vlm, train_set, demo_dir, tmp_path):
    split = Split("train", demo_dir / "vqa")
    out = tmp_path / "beam.json"
    beam_data.main(
        [
            "--train_ques_path", str(split.questions_path),
            "--train_ann_path", str(split.annotations_path),
            "--train_image_root", str(split.image_root),
            "--vqa_model", str(demo_dir / "models" / "qwen2.5-vl-tiny"), "--out", str(out),
            "--num_queries", "2", "--candidate_num", "4", "--beam_size", "3", "--seed", "5",
        ]
    )  # fmt: skip
    expected = build_demo_beam_data(len(train_set), tiny_vlm, num_queries=2, candidate_num=4, beam_size=3, seed=5)
    assert json.loads(out.read_text()) == expected
    beam = load_beam_data(out, num_items=len(train_set))
    assert len(beam.query_ids) == 2 and beam.shot_num == 2


def test_cli_refuses_impossible_settings_before_loading_the_model(demo_dir, tmp_path, capsys):
    split = Split("train", demo_dir / "vqa")
    with pytest.raises(SystemExit) as exit_:
        beam_data.main(
            [
                "--train_ques_path", str(split.questions_path),
                "--train_ann_path", str(split.annotations_path),
                "--train_image_root", str(split.image_root),
                "--vqa_model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "beam.json"),
                "--candidate_num", "1",
            ]
        )  # fmt: skip
    assert exit_.value.code == 2
    assert "error: shot_num must be in 1..min(candidate_num, 273), got 2 (candidate_num 1)" in capsys.readouterr().err
    assert not (tmp_path / "beam.json").exists()
