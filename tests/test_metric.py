"""VQA accuracy: every normalisation rule, both modes, the prepared fast path, and the command."""

from __future__ import annotations

import json
import random
import re

import pytest

from lever_lm.vqa.metric import (
    CONTRACTIONS,
    NUMBER_WORDS,
    evaluate_results,
    main,
    normalize_answer,
    prepare_answers,
    score_prediction,
    vqa_accuracy,
)


def answers(matching: str, count: int, other: str = "cat", n: int = 10) -> list[str]:
    return [matching] * count + [other] * (n - count)


# -- the score itself --------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_score_by_number_of_matching_annotators(count, expected):
    assert vqa_accuracy("dog", answers("dog", count)) == expected


def test_three_of_ten_is_exactly_point_nine_in_both_modes():
    gt = ["dog", "cat", "dog", "cat", "cat", "dog", "cat", "cat", "cat", "cat"]
    assert vqa_accuracy("dog", gt, "always") == 0.9
    assert vqa_accuracy("dog", gt, "official") == 0.9


def test_fewer_than_ten_answers_average_over_what_there_is():
    assert vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_no_answers_and_bad_mode_are_errors():
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])
    with pytest.raises(ValueError, match="mode"):
        vqa_accuracy("dog", ["dog"], mode="lenient")


# -- normalisation rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Red", "red"),  # lower case
        ("\tred \n", "red"),  # tabs, newlines, outer spaces
        ("two", "2"),  # number words to digits
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("a dog", "dog"),  # articles dropped
        ("the red one", "red 1"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contraction table
        ("isnt it", "isn't it"),
        ("dog.", "dog"),  # a period not before a digit goes
        ("2.5", "2.5"),  # a period before a digit stays
        ("hot-dog", "hot dog"),  # a mark with no space beside it becomes a space
        ("yes !", "yes"),  # a mark beside a space is deleted
        ("red,blue", "red blue"),
        ("1,000", "1000"),  # a digit,digit group: every mark is deleted
        ("1,000 (approx)", "1000 approx"),
        ("(left)", "left"),
        ('"yes"', "yes"),
        ("c/o", "c o"),
        ("what?", "what"),
    ],
)
def test_normalisation_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_tables_are_the_official_ones():
    assert len(NUMBER_WORDS) == 12 and NUMBER_WORDS["zero"] == "0"
    assert CONTRACTIONS["youre"] == "you're" and len(CONTRACTIONS) == 120


def test_always_mode_normalises_both_sides():
    assert vqa_accuracy("Two.", answers("2", 10)) == 1.0
    assert vqa_accuracy("2", answers("two", 10)) == 1.0
    assert vqa_accuracy("the dog", answers("dog", 3)) == 0.9


def test_official_mode_leaves_unanimous_answers_unnormalised():
    # All ten agree: the official script only strips whitespace, so "two" does not match "2" ...
    assert vqa_accuracy("two", answers("2", 10), mode="official") == 0.0
    assert vqa_accuracy("Red", answers("red", 10), mode="official") == 0.0
    assert vqa_accuracy(" red\n", answers("red", 10), mode="official") == 1.0
    # ... but once annotators disagree, both sides are normalised.
    assert vqa_accuracy("two", answers("2", 5, other="two"), mode="official") == 1.0
    assert vqa_accuracy("Red.", answers("red", 3), mode="official") == 0.9


# -- the prepared fast path equals a literal transcription of the official loop ------------------


def reference_accuracy(prediction: str, gt_answers: list[str], mode: str) -> float:
    """The evaluate() loop of the official script, transcribed without any shortcut."""
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

    def punctuation(in_text):
        out = in_text
        for p in punct:
            if (p + " " in in_text or " " + p in in_text) or (re.search(r"(\d)(,)(\d)", in_text) is not None):
                out = out.replace(p, "")
            else:
                out = out.replace(p, " ")
        return re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out, re.UNICODE)

    def digit_article(in_text):
        out = []
        for word in in_text.lower().split():
            word = NUMBER_WORDS.get(word, word)
            if word not in ("a", "an", "the"):
                out.append(word)
        return " ".join(CONTRACTIONS.get(word, word) for word in out)

    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    res = prediction.replace("\n", " ").replace("\t", " ").strip()
    if mode == "always" or len(set(gts)) > 1:
        gts = [digit_article(punctuation(a)) for a in gts]
        res = digit_article(punctuation(res))
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1, float(len([a for a in others if a == res])) / 3))
    return float(sum(accs)) / len(accs)


WORDS = [
    "two",
    "2",
    "Two.",
    "a dog",
    "dog",
    "the dog",
    "hot-dog",
    "hot dog",
    "yes",
    "Yes!",
    "1,000",
    "1000",
    "dont",
    "don't",
    " red",
]


@pytest.mark.parametrize("mode", ["always", "official"])
def test_prepared_scores_equal_the_reference_loop(mode):
    rng = random.Random(0)
    for _ in range(300):
        gt = [rng.choice(WORDS[:6]) if rng.random() < 0.7 else rng.choice(WORDS) for _ in range(10)]
        if rng.random() < 0.2:
            gt = [gt[0]] * 10  # unanimous: the official mode's no-normalisation branch
        prepared = prepare_answers(gt, mode)
        for prediction in rng.sample(WORDS, 5):
            expected = reference_accuracy(prediction, gt, mode)
            assert score_prediction(prediction, prepared) == pytest.approx(expected, abs=1e-12)
            assert vqa_accuracy(prediction, gt, mode) == score_prediction(prediction, prepared)


# -- the command -----------------------------------------------------------------------------------


@pytest.fixture
def vqa_files(tmp_path):
    questions = {"questions": [{"question_id": q, "image_id": 1, "question": "?"} for q in (1, 2, 3)]}
    annotations = {
        "annotations": [
            {"question_id": 1, "answer_type": "number", "question_type": "how many",
             "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers("2", 10))]},
            {"question_id": 2, "answer_type": "other", "question_type": "what color",
             "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers("red", 3, other="blue"))]},
            {"question_id": 3, "answer_type": "other", "question_type": "what color",
             "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(answers("green", 10))]},
        ]
    }  # fmt: skip
    results = [
        {"question_id": 1, "answer": "two"},
        {"question_id": 2, "answer": "red"},
        {"question_id": 3, "answer": "pink"},
    ]
    paths = {}
    for name, obj in (("q", questions), ("a", annotations), ("r", results)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj), encoding="utf-8")
    return paths


def test_command_prints_overall_and_per_answer_type(vqa_files, capsys):
    main(["--questions", str(vqa_files["q"]), "--annotations", str(vqa_files["a"]), "--results", str(vqa_files["r"])])
    out = capsys.readouterr().out
    assert "Overall Accuracy is: 63.33" in out  # (1.0 + 0.9 + 0) / 3
    assert "number : 100.00" in out and "other : 45.00" in out


def test_command_official_mode(vqa_files):
    evaluation = evaluate_results(vqa_files["q"], vqa_files["a"], vqa_files["r"], mode="official")
    assert evaluation.overall == 30.0  # "two" no longer matches the unanimous "2"
    assert evaluation.per_answer_type == {"number": 0.0, "other": 45.0}
    assert evaluation.per_question_type == {"how many": 0.0, "what color": 45.0}
    assert evaluation.num_questions == 3


def test_command_rejects_unknown_question_and_missing_file(vqa_files, capsys):
    vqa_files["r"].write_text(json.dumps([{"question_id": 99, "answer": "x"}]), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["--questions", str(vqa_files["q"]), "--annotations", str(vqa_files["a"]), "--results", str(vqa_files["r"])]
        )
    assert exit_info.value.code == 2
    assert "question_id 99 is not in the questions file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--questions", "missing.json", "--annotations", str(vqa_files["a"]), "--results", str(vqa_files["r"])])
    assert "missing.json: file not found" in capsys.readouterr().err
