"""Validation of RL data files: every rule caught, metrics and plot data computed right."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest

from lever_lm.errors import InputError
from lever_lm.rl.validate import (
    Expectations,
    compute_metrics,
    plot_data,
    validate_rl_data,
    write_plots,
)


def candidate(pointer, method="beam", acc=0.0, rank=0, temp=None) -> dict:
    return {
        "pointer": pointer,
        "gen_method": method,
        "beam_rank": rank if method == "beam" else None,
        "beam_score": 0.5 if method == "beam" else None,
        "logprob_score": -1.0 if method in ("beam", "sample") else None,
        "temperature": temp,
        "vqa_raw_generation": "red",
        "vqa_pred_answer": "red",
        "vqa_correct": 1 if acc > 0 else 0,
        "vqa_acc_score": acc,
        "vqa_eval_mode": "vqaEval",
        "eval_failed": False,
    }


def entry(query_idx: int, candidates: list[dict]) -> dict:
    query = {"query_id": query_idx, "question_id": 10 * query_idx, "image_id": query_idx, "question": "q?", "gt_answers_raw": ["red"] * 10}
    return {"query": query, "pointer_candidates": candidates}


@pytest.fixture
def good() -> dict:
    return {
        "3": entry(3, [candidate([1, 2], acc=1.0), candidate([2, 1], rank=1, acc=0.3), candidate([4, 5], "sample", 0.0, temp=1.3)]),
        "7": entry(7, [candidate([1, 2], acc=1.0), candidate([0, 9], "random", 1.0)]),
    }


EXPECTED = Expectations(query_order=[3, 7], shot_num=2, num_items=10)


def test_a_good_file_passes(good):
    validate_rl_data(Path("rl.json"), good, EXPECTED)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: d["3"]["pointer_candidates"][0].update(pointer=[3, 1]), "contains the query itself"),
        (lambda d: d["3"]["pointer_candidates"][0].update(pointer=[1, 10]), "outside 0..9"),
        (lambda d: d["3"]["pointer_candidates"][0].update(pointer=[1, 2, 4]), "expected shot_num = 2"),
        (lambda d: d["3"]["pointer_candidates"][0].update(pointer=[1, 1]), "repeats an id"),
        (lambda d: d["3"]["pointer_candidates"][0].update(vqa_acc_score=0.5), "is not one of"),
        (lambda d: d["3"]["pointer_candidates"][0].update(vqa_correct=0), "disagrees"),
        (lambda d: d["3"]["pointer_candidates"][1].update(pointer=[1, 2]), "appears twice"),
        (lambda d: d["3"]["pointer_candidates"][2].update(temperature=None), "temperature > 0"),
        (lambda d: d["3"]["pointer_candidates"][0].pop("vqa_pred_answer"), "vqa_pred_answer missing"),
        (lambda d: d["3"].update(pointer_candidates=[]), "first query (3) has no candidates"),
        (lambda d: d.pop("7"), "missing [7]"),
        (lambda d: d.update({"meta": {}}), "non-numeric keys"),
    ],
)
def test_each_violation_is_reported(good, breakage, message):
    broken = copy.deepcopy(good)
    breakage(broken)
    with pytest.raises(InputError, match="problem") as error:
        validate_rl_data(Path("rl.json"), broken, EXPECTED)
    assert message in str(error.value)
    assert "rl.json" in str(error.value)


def test_metrics_values(good):
    meta = {"counts": {"duplicates_dropped": {"beam": 0, "sample": 2, "random": 1}}}
    metrics = compute_metrics(good, meta)
    assert metrics["queries"] == 2 and metrics["candidates"] == 5
    assert metrics["candidates_per_query"] == {"mean": 2.5, "min": 2, "max": 3}
    assert metrics["accuracy"] == pytest.approx((1.0 + 0.3 + 0 + 1.0 + 1.0) / 5)
    assert metrics["share_correct"] == pytest.approx(4 / 5)
    assert metrics["best_of_group_accuracy"] == 1.0
    assert metrics["beam_top1_accuracy"] == 1.0
    assert metrics["share_non_flat_groups"] == 0.5  # query 7 is all 1.0
    assert metrics["mean_group_reward_std"] == pytest.approx(statistics.pstdev([1.0, 0.3, 0.0]) / 2, abs=1e-6)
    assert metrics["by_label"]["sample@1.3"] == {"candidates": 1, "accuracy": 0.0, "share_correct": 0.0}
    assert metrics["duplicates_dropped_total"] == 3


def test_plot_data_and_files(good, tmp_path):
    plots = plot_data(good)
    beam_rows = {r["reward"]: r["count"] for r in plots["reward_distribution"] if r["method"] == "beam"}
    assert beam_rows == {0.0: 0, 0.3: 1, 0.6: 0, 0.9: 0, 1.0: 2}
    histogram = {r["group_reward_std"]: r["queries"] for r in plots["group_reward_std"]}
    assert histogram["flat"] == 1 and histogram["0.4-0.5"] == 1 and sum(histogram.values()) == 2
    written = write_plots(plots, tmp_path)
    assert {p.name for p in written} == {
        "reward_distribution.csv", "group_reward_std.csv", "reward_distribution.png", "group_reward_std.png"
    }  # fmt: skip
    assert (tmp_path / "reward_distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert json.dumps(plots)  # plain data
