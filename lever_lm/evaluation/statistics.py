"""How sure a mean is, and whether one way of choosing ICDs beats another on the same queries.

* `bootstrap_mean`: the mean of per-query scores with a percentile bootstrap 95% interval
  (queries resampled with replacement).
* `paired_comparison`: for two methods scored on the same queries, the mean of the per-query
  differences with its bootstrap interval (the same resampling, applied to the differences, so the
  queries' shared difficulty cancels), the counts of queries where the first wins, ties and loses,
  and the exact two-sided sign test over the queries that do not tie.

Deterministic: the resampling comes from a torch generator seeded by `seed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

RESAMPLES = 10_000
CONFIDENCE = 0.95
# Resamples drawn at once: bounds the [chunk, n] index tensor (80 MB at n = 1,000).
_CHUNK = 1_000
# Per-query scores closer than this are a tie (mean accuracies of a few draws are sums of tenths).
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Estimate:
    """A mean and its bootstrap interval over n queries."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self, digits: int = 4) -> dict:
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method B on the same queries: A - B."""

    difference: Estimate
    wins: int  # queries where A scores higher
    ties: int
    losses: int
    sign_test_p: float  # exact two-sided sign test over wins + losses

    def as_dict(self, digits: int = 4) -> dict:
        return {
            "difference": self.difference.as_dict(digits),
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "sign_test_p": round(self.sign_test_p, digits),
        }


def bootstrap_mean(
    values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE
) -> Estimate:
    """The mean of `values` with a percentile bootstrap interval (`resamples` resamples of the values)."""
    x = torch.as_tensor(list(values), dtype=torch.float64)
    n = x.numel()
    if n == 0:
        raise ValueError("no values to estimate a mean from")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}")
    generator = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        rows = min(_CHUNK, resamples - start)
        means.append(x[torch.randint(n, (rows, n), generator=generator)].mean(dim=1))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(torch.cat(means), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Estimate(mean=float(x.mean()), low=low, high=high, n=n)


def paired_comparison(
    a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = RESAMPLES, confidence: float = CONFIDENCE
) -> PairedComparison:
    """A against B, query by query (`a[i]` and `b[i]` are the same query's scores)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same queries: {len(a)} against {len(b)}")
    differences = [x - y for x, y in zip(a, b)]
    wins = sum(d > TIE_TOLERANCE for d in differences)
    losses = sum(d < -TIE_TOLERANCE for d in differences)
    return PairedComparison(
        difference=bootstrap_mean(differences, seed, resamples, confidence),
        wins=wins,
        ties=len(differences) - wins - losses,
        losses=losses,
        sign_test_p=sign_test(wins, losses),
    )


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least this uneven | each side equally likely)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)
