"""The GRPO trainer's reward modes, as it computes them from a candidate's fields (docs/formats.md §7).

With hard = `vqa_correct`, soft = `vqa_acc_score`, gtprob = `vqa_gt_prob` (a missing or null value
counts as 0, as in the trainer) and rel = `vqa_rel_score`, and weights hw, sw, rw:

    hard_plus_soft               = hw*hard + sw*soft
    hard01_plus_gtprob           = hw*hard + sw*gtprob
    hard01_plus_gtprob_separated = 2*hw + sw*gtprob if hard == 1 else sw*gtprob
    hard_plus_gtprob_plus_rel    = hw*hard + sw*gtprob + rw*(1 - hard)*rel

The validation stage reports, per mode, how many groups carry a signal (rewards not all equal)
and how spread they are: GRPO learns only from groups whose rewards differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardWeights:
    hard: float = 1.0  # hw
    soft: float = 1.0  # sw
    rel: float = 0.1  # rw


def _fields(c: dict) -> tuple[float, float, float, float]:
    return (
        float(c["vqa_correct"]),
        float(c["vqa_acc_score"]),
        float(c.get("vqa_gt_prob") or 0.0),
        float(c.get("vqa_rel_score") or 0.0),
    )


def hard_plus_soft(c: dict, w: RewardWeights) -> float:
    hard, soft, _, _ = _fields(c)
    return w.hard * hard + w.soft * soft


def hard01_plus_gtprob(c: dict, w: RewardWeights) -> float:
    hard, _, gtprob, _ = _fields(c)
    return w.hard * hard + w.soft * gtprob


def hard01_plus_gtprob_separated(c: dict, w: RewardWeights) -> float:
    hard, _, gtprob, _ = _fields(c)
    return (2 * w.hard if hard == 1 else 0.0) + w.soft * gtprob


def hard_plus_gtprob_plus_rel(c: dict, w: RewardWeights) -> float:
    hard, _, gtprob, rel = _fields(c)
    return w.hard * hard + w.soft * gtprob + w.rel * (1 - hard) * rel


REWARD_MODES: dict[str, Callable[[dict, RewardWeights], float]] = {
    "hard_plus_soft": hard_plus_soft,
    "hard01_plus_gtprob": hard01_plus_gtprob,
    "hard01_plus_gtprob_separated": hard01_plus_gtprob_separated,
    "hard_plus_gtprob_plus_rel": hard_plus_gtprob_plus_rel,
}
GT_PROB_MODES = ("hard01_plus_gtprob", "hard01_plus_gtprob_separated", "hard_plus_gtprob_plus_rel")
