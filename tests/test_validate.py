"""Validation of RL data files: every rule caught, every recomputable field recomputed, metrics right."""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from lever_lm.errors import InputError
from lever_lm.models.v3.proposals import ProposalSettings
from lever_lm.rl.checks import Expectations, load_rl_data, validate_rl_data
from lever_lm.rl.metrics import compute_breakdown, compute_metrics
from lever_lm.rl.plots import plot_data, write_plots
from lever_lm.rl.records import RecordRules
from lever_lm.vqa.relevance import relevance

# red: 4 of 10 annotators (accuracy 1.0), blue: 1 (0.3), anything else 0.
ANSWERS = ("red", "red", "red", "red", "blue", "green", "green", "pink", "gray", "teal")
ACCURACY = {"red": 1.0, "blue": 0.3, "yellow": 0.0}


def candidate(pointer, method="beam", answer="red", rank=0, temp=None) -> dict:
    acc = ACCURACY[answer]
    return {
        "pointer": pointer,
        "gen_method": method,
        "beam_rank": rank if method == "beam" else None,
        "beam_score": 0.5 if method == "beam" else None,
        "logprob_score": -1.0 if method in ("beam", "sample") else None,
        "temperature": temp,
        "vqa_raw_generation": f" {answer} Question",
        "vqa_pred_answer": answer,
        "vqa_correct": 1 if acc > 0 else 0,
        "vqa_acc_score": acc,
        "vqa_eval_mode": "vqaEval",
        "eval_failed": False,
        "vqa_gt_prob": None,
        **relevance(answer, ANSWERS),
    }


def entry(query_idx: int, candidates: list[dict]) -> dict:
    query = {
        "query_id": query_idx,
        "question_id": 10 * query_idx,
        "image_id": query_idx,
        "question": "q?",
        "gt_answers_raw": list(ANSWERS),
    }
    return {"query": query, "pointer_candidates": candidates}


@pytest.fixture
def good() -> dict:
    return {
        "3": entry(3, [candidate([1, 2]), candidate([2, 1], rank=1, answer="blue"), candidate([4, 5], "sample", "yellow", temp=1.3)]),
        "7": entry(7, [candidate([1, 2]), candidate([0, 9], "random")]),
    }  # fmt: skip


class FakeDataset:
    def __getitem__(self, row: int):
        return SimpleNamespace(question_id=10 * row, image_id=row, question="q?")


PROPOSAL = ProposalSettings(num_beams=2, temps=(1.0, 1.3), num_samples_per_temp=1, num_random=1, num_retrieval=0)
EXPECTED = Expectations(
    query_order=[3, 7],
    rules=RecordRules(shot_num=2, num_items=10),
    dataset=FakeDataset(),
    answers={3: ANSWERS, 7: ANSWERS},
    proposal=PROPOSAL,
)


def test_a_good_file_passes(good):
    validate_rl_data(Path("rl.json"), good, EXPECTED)


def _first(d):
    return d["3"]["pointer_candidates"][0]


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: _first(d).update(pointer=[3, 1]), "contains the query itself"),
        (lambda d: _first(d).update(pointer=[1, 10]), "outside 0..9"),
        (lambda d: _first(d).update(pointer=[1, 2, 4]), "expected shot_num = 2"),
        (lambda d: _first(d).update(pointer=[1, 1]), "repeats an id"),
        (lambda d: _first(d).update(vqa_acc_score=0.5), "is not one of"),
        (lambda d: _first(d).update(vqa_correct=0), "disagrees"),
        (lambda d: d["3"]["pointer_candidates"][1].update(pointer=[1, 2]), "appears twice"),
        (lambda d: d["3"]["pointer_candidates"][2].update(temperature=None), "temperature > 0"),
        (lambda d: _first(d).pop("vqa_pred_answer"), "vqa_pred_answer missing"),
        (lambda d: d["3"].update(pointer_candidates=[]), "query 3: no candidates"),
        (lambda d: d.pop("7"), "missing [7]"),
        (lambda d: d.update({"meta": {}}), "not query indices"),
        (lambda d: d.update({"\u00b3": {}}), "not query indices"),
        # edits only a recomputation catches
        (lambda d: _first(d).update(vqa_pred_answer="banana"), "not the post-processed vqa_raw_generation"),
        (lambda d: _first(d).update(vqa_pred_answer="blue", vqa_raw_generation="blue"), "its answer scores 0.3"),
        (lambda d: d["3"]["query"].update(gt_answers_raw=["banana"] * 10), "differ from the annotations"),
        (lambda d: d["3"]["query"].update(question_id=1), "query.question_id is 1, the data set says 30"),
        (lambda d: d["3"]["query"].update(question="edited"), "query.question is 'edited'"),
        (lambda d: _first(d).update(eval_failed=True, vqa_acc_score=0.0, vqa_correct=0), "needs its reason"),
        (lambda d: d["3"]["pointer_candidates"][2].update(temperature=0.5), "'sample@0.5' candidates"),
        (lambda d: d["7"]["pointer_candidates"].append(candidate([5, 6], "random")), "2 'random' candidates"),
        (lambda d: _first(d).update(vqa_gt_prob=1.5), "vqa_gt_prob must be a probability"),
        (lambda d: _first(d).update(vqa_rel_score=0.1), "vqa_rel_score must be the larger"),
        (
            lambda d: _first(d).update(vqa_rel_token_f1=0.5, vqa_rel_score=max(0.5, _first(d)["vqa_rel_edit_sim"])),
            "relevance fields differ",
        ),
        (lambda d: _first(d).pop("vqa_rel_edit_sim"), "must be numbers in [0, 1]"),
    ],
)
def test_each_violation_is_reported(good, breakage, message):
    broken = copy.deepcopy(good)
    breakage(broken)
    with pytest.raises(InputError, match="problem") as error:
        validate_rl_data(Path("rl.json"), broken, EXPECTED)
    assert message in str(error.value)
    assert "rl.json" in str(error.value)


def test_too_many_failed_evaluations_fail_the_validation(good):
    failed = copy.deepcopy(good)
    _first(failed).update(eval_failed=True, eval_error="generation failed: boom", vqa_acc_score=0.0, vqa_correct=0)
    _first(failed).update(vqa_raw_generation="", vqa_pred_answer="")
    validate_rl_data(Path("rl.json"), failed, replace(EXPECTED, max_failed_share=0.2))  # 1 of 5
    with pytest.raises(InputError, match="1 of 5 evaluations failed"):
        validate_rl_data(Path("rl.json"), failed, replace(EXPECTED, max_failed_share=0.1))


def test_a_key_written_twice_is_refused(tmp_path, good):
    text = json.dumps(good)
    path = tmp_path / "rl.json"
    path.write_text(text[:-1] + ', "3": ' + json.dumps(good["3"]) + "}")
    with pytest.raises(InputError, match="key '3' appears twice"):
        load_rl_data(path)


def test_metrics_values(good):
    metrics = compute_metrics(good)
    assert metrics["queries"] == 2 and metrics["candidates"] == 5
    assert metrics["accuracy"] == pytest.approx((1.0 + 0.3 + 0 + 1.0 + 1.0) / 5)
    assert metrics["best_acc"] == 1.0
    assert metrics["top1_acc"] == 1.0
    assert metrics["non_flat"] == 0.5  # query 7 is all 1.0
    assert metrics["group_std"] == pytest.approx(statistics.pstdev([1.0, 0.3, 0.0]) / 2, abs=1e-6)
    assert len([k for k, v in metrics.items() if not isinstance(v, dict)]) <= 10, "a headline for `dvc exp show`"
    counts = {"duplicates_dropped": {"beam": 0, "sample": 2, "random": 1}, "unscorable_queries": {}}
    breakdown = compute_breakdown(good, SimpleNamespace(counts=SimpleNamespace(**counts)))
    assert breakdown["candidates_per_query"] == {"mean": 2.5, "min": 2, "max": 3}
    assert breakdown["share_correct"] == pytest.approx(4 / 5)
    assert breakdown["by_label"]["sample@1.3"] == {"candidates": 1, "accuracy": 0.0, "share_correct": 0.0}
    assert breakdown["duplicates_dropped"] == {"beam": 0, "random": 1, "sample": 2}


def test_plot_data_and_files(good, tmp_path):
    plots = plot_data(good)
    beam_rows = {r["reward"]: r["count"] for r in plots["reward_distribution"] if r["method"] == "beam"}
    assert beam_rows == {0.0: 0, 0.3: 1, 0.6: 0, 0.9: 0, 1.0: 2}
    histogram = {r["group_reward_std"]: r["queries"] for r in plots["group_reward_std"]}
    assert histogram["flat"] == 1 and histogram["0.4-0.5"] == 1 and sum(histogram.values()) == 2
    written = write_plots(plots, tmp_path)
    assert {p.name for p in written} == {
        "reward_distribution.csv", "group_reward_std.csv", "reward_distribution.png", "group_reward_std.png",
        "gt_prob_by_accuracy.csv", "gt_prob_by_accuracy.png",
    }  # fmt: skip
    assert (tmp_path / "reward_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert json.dumps(plots)  # plain data


def with_gt_prob(data: dict, values: dict[tuple[str, int], float]) -> dict:
    data = copy.deepcopy(data)
    for (key, n), value in values.items():
        data[key]["pointer_candidates"][n]["vqa_gt_prob"] = value
    return data


def test_dense_reward_metrics(good):
    # query 3: red (1.0), blue (0.3), yellow (0.0); query 7: red, red -- flat in accuracy
    data = with_gt_prob(good, {("3", 0): 0.8, ("3", 1): 0.4, ("3", 2): 0.1, ("7", 0): 0.9, ("7", 1): 0.6})
    metrics = compute_metrics(data)
    assert compute_breakdown(data)["gt_prob"]["mean"] == pytest.approx((0.8 + 0.4 + 0.1 + 0.9 + 0.6) / 5)
    # ranks of gt_prob: 4, 2, 1, 5, 3; of accuracy (ties averaged): 4, 2, 1, 4, 4
    assert metrics["gt_rho"] == pytest.approx(8 / 80**0.5, abs=1e-6)
    modes = compute_breakdown(data)["reward_modes"]
    assert modes["hard_plus_soft"]["non_flat"] == 0.5  # query 7 is flat in hard and soft
    assert modes["hard01_plus_gtprob"]["non_flat"] == 1.0  # ... but not once gt_prob is added
    std7 = statistics.pstdev([1 + 0.9, 1 + 0.6])
    std3 = statistics.pstdev([1 + 0.8, 1 + 0.4, 0 + 0.1])
    assert modes["hard01_plus_gtprob"]["group_std"] == pytest.approx((std3 + std7) / 2, abs=1e-6)
    separated = statistics.pstdev([2 + 0.8, 2 + 0.4, 0.1])
    assert modes["hard01_plus_gtprob_separated"]["group_std"] == pytest.approx((separated + std7) / 2, abs=1e-6)
    rel_yellow = data["3"]["pointer_candidates"][2]["vqa_rel_score"]
    rel3 = statistics.pstdev([1 + 0.8, 1 + 0.4, 0.1 + 0.1 * rel_yellow])
    assert modes["hard_plus_gtprob_plus_rel"]["group_std"] == pytest.approx((rel3 + std7) / 2, abs=1e-6)
    breakdown = compute_breakdown(data)["gt_prob"]
    assert breakdown["mean_when_correct"] == pytest.approx((0.8 + 0.4 + 0.9 + 0.6) / 4)
    assert breakdown["mean_when_incorrect"] == pytest.approx(0.1)
    assert breakdown["accuracy_flat_groups"] == 1 and breakdown["share_of_them_where_gt_prob_differs"] == 1.0


def test_without_gt_prob_only_the_hard_and_soft_mode_is_reported(good):
    metrics = compute_metrics(good)
    assert "gt_rho" not in metrics
    assert list(compute_breakdown(good)["reward_modes"]) == ["hard_plus_soft"]


def test_a_file_with_its_pools_inside_query_is_refused_in_one_line(tmp_path, good):
    """The layout of earlier versions: the lineage's trainer would read its local pointers as global rows."""
    old = copy.deepcopy(good)
    for entry in old.values():
        entry["query"]["candidate_pool_ids"] = [1, 2, 4, 5, 0, 9]
    path = tmp_path / "rl.json"
    path.write_text(json.dumps(old))
    with pytest.raises(InputError) as error:
        load_rl_data(path)
    message = str(error.value)
    assert "\n" not in message
    assert "2 queries hold candidate_pool_ids inside 'query'" in message and "regenerate the file" in message
