"""Relevance fields and the expected accuracy, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from lever_lm.vqa.expected_accuracy import distinct_answers, expected_accuracy
from lever_lm.vqa.metric import prepare_answers
from lever_lm.vqa.relevance import FIELDS, edit_similarity, relevance, token_f1


def test_field_names_are_the_trainers():
    assert FIELDS == ("vqa_rel_token_f1", "vqa_rel_edit_sim", "vqa_rel_score")
    assert set(relevance("red", ["red"])) == set(FIELDS)


@pytest.mark.parametrize(
    ("prediction", "answers", "f1", "edit"),
    [
        ("Red", ["red", "blue"], 1.0, 1.0),  # lowercased
        ("  YES ", [" Yes"], 1.0, 1.0),  # stripped
        # tokens {yes} vs {yes, please}: P = 1, R = 1/2, F1 = 2/3; "yes" in "yes please": 2*3/(3+10) = 6/13
        ("yes", ["no", "yes please"], 2 / 3, 6 / 13),
        # tokens {red, car} vs {a, red, truck}: P = 1/2, R = 1/3, F1 = 0.4; edit: "red " matches 4
        # characters, then one letter of "car" one of "truck": 2*5/(7+11) = 5/9
        ("red car", ["a red truck"], 0.4, 5 / 9),
        # punctuation is no token: F1 = 1; edit: "red" + " white" match 9 characters of 10 + 9: 18/19
        ("red, white", ["red white"], 1.0, 18 / 19),
        ("two", ["2"], 0.0, 0.0),  # no shared token, no shared character
        ("abcd", ["abef"], 0.0, 0.5),  # one token each, different; "ab" matches: 2*2/8
    ],
)
def test_hand_computed_relevance(prediction, answers, f1, edit):
    got = relevance(prediction, answers)
    assert got["vqa_rel_token_f1"] == pytest.approx(f1)
    assert got["vqa_rel_edit_sim"] == pytest.approx(edit)
    assert got["vqa_rel_score"] == max(got["vqa_rel_token_f1"], got["vqa_rel_edit_sim"])


def test_each_field_is_its_own_maximum_over_the_answers():
    """F1 and edit similarity may peak on different answers; the score is the larger of the two maxima."""
    got = relevance("the dog", ["dog", "the dig"])
    assert got["vqa_rel_token_f1"] == pytest.approx(token_f1("the dog", "dog"))  # 2*(1/2*1)/(3/2) = 2/3
    assert got["vqa_rel_token_f1"] == pytest.approx(2 / 3)
    assert got["vqa_rel_edit_sim"] == pytest.approx(edit_similarity("the dog", "the dig"))  # 2*6/14
    assert got["vqa_rel_edit_sim"] == pytest.approx(6 / 7)
    assert got["vqa_rel_score"] == pytest.approx(6 / 7)


@pytest.mark.parametrize("prediction", ["", "   ", "\n"])
def test_an_empty_prediction_scores_zero(prediction):
    assert relevance(prediction, ["yes", ""]) == dict.fromkeys(FIELDS, 0.0)


def test_no_answers_score_zero():
    assert relevance("yes", []) == dict.fromkeys(FIELDS, 0.0)


def test_token_f1_counts_repeated_tokens_once_per_match():
    # {a, a, b} vs {a, b, b}: overlap {a, b} = 2; P = R = 2/3
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)
    assert token_f1("!!", "a") == 0.0


# -- the expected accuracy (vqa_gt_prob) ----------------------------------------------------------


def test_distinct_answers_are_stripped_raw_strings_in_first_occurrence_order():
    assert distinct_answers(["two", " two", "2", "Two", "two ", "2"]) == ("two", "2", "Two")
    assert distinct_answers([]) == ()


def test_expected_accuracy_hand_computed():
    # 10 answers: "two" x4, "2" x3, "three" x3. Normalised, "two" and "2" are both "2" (7 of 10: acc 1)
    # and "three" is "3" (3 of 10: acc 0.9). So 0.5*1 + 0.2*1 + 0.1*0.9 = 0.79.
    answers = ["two"] * 4 + ["2"] * 3 + ["three"] * 3
    replies = distinct_answers(answers)
    assert replies == ("two", "2", "three")
    logprobs = [math.log(0.5), math.log(0.2), math.log(0.1)]
    assert expected_accuracy(replies, logprobs, prepare_answers(answers, "always")) == pytest.approx(0.79)
    assert expected_accuracy(replies, logprobs, prepare_answers(answers, "official")) == pytest.approx(0.79)


def test_expected_accuracy_follows_the_eval_mode():
    """In mode "official", identical human answers are not normalised: only the exact string earns."""
    answers = ["Two"] * 10
    replies, logprobs = ("Two", "two"), [math.log(0.6), math.log(0.3)]
    assert expected_accuracy(replies, logprobs, prepare_answers(answers, "official")) == pytest.approx(0.6)
    assert expected_accuracy(replies, logprobs, prepare_answers(answers, "always")) == pytest.approx(0.9)


def test_expected_accuracy_stays_in_the_unit_interval():
    prepared = prepare_answers(["yes"] * 10)
    assert expected_accuracy(("yes",), [0.0], prepared) == 1.0
    assert expected_accuracy(("yes",), [-1e4], prepared) == 0.0
    assert expected_accuracy((), [], prepared) == 0.0
    # Probabilities that add up to 1 but round above it are capped.
    rounded_up = [math.log(0.5) + 1e-12, math.log(0.5) + 1e-12]
    assert expected_accuracy(("yes", "Yes"), rounded_up, prepared) == 1.0


def test_expected_accuracy_refuses_mismatched_inputs():
    prepared = prepare_answers(["yes"])
    with pytest.raises(ValueError, match="2 replies but 1"):
        expected_accuracy(("yes", "no"), [0.0], prepared)
    with pytest.raises(ValueError, match="distinct"):
        expected_accuracy(("yes", "yes"), [-1.0, -1.0], prepared)
