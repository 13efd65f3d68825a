"""The model's expected VQA accuracy over the human answers: `vqa_gt_prob` (docs/formats.md §7).

    vqa_gt_prob = sum over the distinct stripped human answer strings r of P(r | prompt) * acc(r)

* The strings are the raw human answers, stripped, each distinct string once (first-occurrence
  order): "two" and "2" are separate strings, and their probabilities add.
* P(r | prompt) is the backend's teacher-forced probability that the assistant's reply is exactly
  r followed by the end-of-turn token (`Generation.reply_logprobs`, natural log), in the prompt
  generation used. It is the probability of r's own tokenisation, the one the chat template gives
  it; the other token sequences that also spell r are not counted, so it slightly underestimates
  the probability of the string.
* acc(r) is `metric.score_prediction(r, prepared)`: the accuracy our metric gives prediction r in
  the run's eval mode.

Distinct strings followed by the end token are disjoint sequences, so their probabilities sum to
at most 1, and so does the expected accuracy (acc <= 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lever_lm.vqa.metric import PreparedAnswers, score_prediction


def distinct_answers(human_answers: Sequence[str]) -> tuple[str, ...]:
    """The distinct stripped human answers in first-occurrence order: the replies a backend scores."""
    return tuple(dict.fromkeys(answer.strip() for answer in human_answers))


def expected_accuracy(replies: Sequence[str], reply_logprobs: Sequence[float], prepared: PreparedAnswers) -> float:
    """sum_r exp(logprob_r) * acc(r) over `distinct_answers`' strings and their log-probabilities, in [0, 1].

    The sum can exceed 1 only by float rounding of probabilities that add up to 1; it is capped there.
    """
    if len(replies) != len(reply_logprobs):
        raise ValueError(f"{len(replies)} replies but {len(reply_logprobs)} log-probabilities")
    if len(set(replies)) != len(replies):
        raise ValueError("replies must be distinct strings (use distinct_answers)")
    total = math.fsum(
        math.exp(logprob) * score_prediction(reply, prepared) for reply, logprob in zip(replies, reply_logprobs)
    )
    return min(1.0, total)
