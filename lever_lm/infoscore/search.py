"""Beam search by InfoScore: the ICD sequences of a query's pool that raise the VLM's probability of
its answer most (the lineage's data generation, `generate_data.py`).

With P(S) the VLM's probability of the query's answer y after the ICD sequence S
(`lever_lm.infoscore.probability`), adding the candidate c to the ICDs S already picked scores

    InfoScore(c | S) = P(S + c) - P(S).

The search starts from the empty sequence. Each of `shot_num` steps scores every expansion (beam,
c) with c a pool item not in the beam -- all of them in one call, so the VLM sees them as one
batch -- and keeps the `beam_size` best expansions over all beams. Where c goes in the prompt is
`construct_order`, the lineage's name: `left` puts it first (the lineage's default: a sequence
is built from its last ICD back), `right` puts it after the ICDs already picked, right before the
query. Either way a beam's ICDs are kept in prompt order.

Ranking (`ranking`):
- `last`, the lineage's: an expansion's InfoScore, the gain of its last step alone;
- `sum`: the summed InfoScore of its steps, which telescopes to P(S + c) - P([]): the gain of the
  whole sequence over no ICD. On a VLM whose probability of the answer saturates, `last` keeps the
  beams whose first ICD did NOT help (they have the most room left to gain at the second step)
  and drops a pair of two good ICDs, whose second adds little; `sum` ranks whole sequences by what
  they do for the query, which is what the pointer is trained to produce.

Ties break toward the lower beam, then the lower row id (deterministic, whatever the pool order).
Expansions whose probability could not be computed (a failed prompt: `None`) are never kept.

Cost: 1 + C prompts at step 1 and B * (C - t) at step t + 1 (C pool items, B beams): 1 + 64 +
5 * 63 = 380 per query for the lineage's settings (it spends 385: it scores P(S) again per beam).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lever_lm.errors import InputError

RANKINGS = ("sum", "last")
CONSTRUCT_ORDERS = ("right", "left")

# P(S) for many ICD sequences S (prompt order) of one query, in one call: a probability, or None
# for a sequence whose prompt failed.
Probability = Callable[[Sequence[Sequence[int]]], list[float | None]]


@dataclass(frozen=True)
class SearchSettings:
    """How the beam search runs; every field shapes the result (the fingerprint holds them all)."""

    shot_num: int = 2  # ICDs per sequence (the lineage's few_shot_num)
    beam_size: int = 5
    ranking: str = "sum"  # sum | last (the lineage's)
    construct_order: str = "right"  # right | left (the lineage's): where a new ICD goes in the prompt

    def __post_init__(self) -> None:
        if self.shot_num < 1:
            raise InputError(None, f"--shot_num must be >= 1, got {self.shot_num}")
        if self.beam_size < 1:
            raise InputError(None, f"--beam_size must be >= 1, got {self.beam_size}")
        if self.ranking not in RANKINGS:
            raise InputError(None, f"--ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}")
        if self.construct_order not in CONSTRUCT_ORDERS:
            raise InputError(
                None, f"--construct_order must be one of {', '.join(CONSTRUCT_ORDERS)}, got {self.construct_order!r}"
            )


@dataclass(frozen=True)
class Beam:
    """A sequence the search kept: its ICDs in prompt order and in pick order, P(ICDs), and the
    InfoScore of each step in pick order (their sum is P(ICDs) - P([]))."""

    icds: tuple[int, ...]
    picks: tuple[int, ...]
    probability: float
    gains: tuple[float, ...]


@dataclass(frozen=True)
class SearchResult:
    """The kept beams, best first; P([]); the prompts scored and how many of them failed."""

    beams: list[Beam]
    base_probability: float | None
    prompts: int
    failed: int


def info_score_search(probability: Probability, pool: Sequence[int], settings: SearchSettings) -> SearchResult:
    """The beam search of the module doc over `pool` (rows of the training split, the query excluded).

    When P([]) cannot be computed there is nothing to measure gains against: no beams.
    """
    first = [()] + [(c,) for c in pool]
    scores = probability(first)
    prompts, failed = len(first), sum(p is None for p in scores)
    base = scores[0]
    if base is None:
        return SearchResult([], None, prompts, failed)
    beams = [Beam((), (), base, ())]
    expansions = [(0, c) for c in pool]
    values = scores[1:]
    for step in range(settings.shot_num):
        if step:
            expansions = [(b, c) for b, beam in enumerate(beams) for c in pool if c not in beam.picks]
            values = probability([_insert(beams[b].icds, c, settings.construct_order) for b, c in expansions])
            prompts, failed = prompts + len(values), failed + sum(p is None for p in values)
        beams = _best(beams, expansions, values, settings)
        if not beams:
            break
    return SearchResult(beams, base, prompts, failed)


def _best(beams: list[Beam], expansions: list[tuple[int, int]], values: list, settings: SearchSettings) -> list[Beam]:
    """The `beam_size` best expansions by the ranking, ties to the lower (beam, row)."""
    scored = [(k, p) for k, p in enumerate(values) if p is not None]
    if settings.ranking == "sum":  # P([]) is the same for every expansion: rank by P itself
        key = lambda item: (-item[1], expansions[item[0]])  # noqa: E731
    else:
        key = lambda item: (-(item[1] - beams[expansions[item[0]][0]].probability), expansions[item[0]])  # noqa: E731
    kept = []
    for k, p in sorted(scored, key=key)[: settings.beam_size]:
        b, c = expansions[k]
        beam = beams[b]
        icds = _insert(beam.icds, c, settings.construct_order)
        kept.append(Beam(icds, beam.picks + (c,), p, beam.gains + (p - beam.probability,)))
    return kept


def _insert(icds: tuple[int, ...], c: int, construct_order: str) -> tuple[int, ...]:
    return (c, *icds) if construct_order == "left" else (*icds, c)
