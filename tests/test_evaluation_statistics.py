"""The evaluation's statistics on inputs whose answers are known."""

from __future__ import annotations

import math
import random

import pytest

from lever_lm.evaluation.statistics import bootstrap_mean, paired_comparison, sign_test


def test_constant_scores_have_a_point_interval():
    estimate = bootstrap_mean([0.6] * 50)
    assert (estimate.mean, estimate.low, estimate.high, estimate.n) == (pytest.approx(0.6), 0.6, 0.6, 50)


def test_the_interval_of_a_coin_matches_the_normal_approximation():
    values = [1.0] * 200 + [0.0] * 200  # mean 0.5, standard error sqrt(0.25 / 400) = 0.025
    estimate = bootstrap_mean(values, seed=3)
    assert estimate.mean == 0.5
    assert estimate.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006)
    assert estimate.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_the_bootstrap_is_deterministic_for_a_seed_and_changes_with_it():
    rng = random.Random(0)
    values = [rng.random() for _ in range(100)]
    assert bootstrap_mean(values, seed=1) == bootstrap_mean(values, seed=1)
    assert bootstrap_mean(values, seed=1) != bootstrap_mean(values, seed=2)


def test_the_interval_covers_the_mean_and_narrows_with_more_queries():
    rng = random.Random(1)
    small = [rng.choice((0.0, 0.3, 0.6, 1.0)) for _ in range(50)]
    large = small * 16
    a, b = bootstrap_mean(small), bootstrap_mean(large)
    assert a.low < a.mean < a.high and b.low < b.mean < b.high
    assert (b.high - b.low) == pytest.approx((a.high - a.low) / 4, rel=0.15)  # width ~ 1 / sqrt(n)


def test_paired_comparison_counts_and_differences():
    a = [1.0, 1.0, 0.6, 0.0, 0.3, 1.0]
    b = [0.0, 1.0, 0.3, 0.6, 0.3, 0.4 + 0.6]  # 1.0 up to rounding: a tie
    result = paired_comparison(a, b)
    assert (result.wins, result.ties, result.losses) == (2, 3, 1)
    assert result.difference.mean == pytest.approx((1.0 + 0.3 - 0.6) / 6)
    assert result.sign_test_p == pytest.approx(1.0)  # 2 wins, 1 loss
    assert result.difference.low <= result.difference.mean <= result.difference.high


def test_a_paired_gap_is_sure_when_every_query_moves_the_same_way():
    a = [0.7 + 0.001 * i for i in range(40)]
    b = [x - 0.1 for x in a]
    result = paired_comparison(a, b)
    assert result.difference.mean == pytest.approx(0.1)
    assert result.difference.low == pytest.approx(0.1) and result.difference.high == pytest.approx(0.1)
    assert (result.wins, result.ties, result.losses) == (40, 0, 0)
    assert result.sign_test_p == pytest.approx(2 / 2**40)


@pytest.mark.parametrize(
    "wins, losses, expected",
    [
        (9, 1, 2 * 11 / 1024),  # P(X <= 1) for Binomial(10, 1/2), two-sided
        (1, 9, 2 * 11 / 1024),
        (5, 5, 1.0),
        (0, 0, 1.0),
        (3, 0, 2 / 8),
        (20, 10, 2 * sum(math.comb(30, k) for k in range(11)) / 2**30),
    ],
)
def test_sign_test_is_the_exact_binomial_tail(wins, losses, expected):
    assert sign_test(wins, losses) == pytest.approx(expected)


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="same queries"):
        paired_comparison([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
