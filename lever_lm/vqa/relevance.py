"""Relevance of a predicted answer to the human answers: a dense signal beside the all-or-nothing accuracy.

The lineage's trainer reads three per-candidate fields (docs/formats.md §7), defined exactly as its generator
computed them:

* `vqa_rel_token_f1`: the maximum, over the human answers, of the token F1 between the prediction
  and the answer, on lowercased `[a-z0-9]+` tokens (multiset overlap, as in SQuAD's F1);
* `vqa_rel_edit_sim`: the maximum of `difflib.SequenceMatcher(None, prediction, answer).ratio()`;
* `vqa_rel_score`: the larger of the two.

The prediction (the post-processed answer) and the human answers are stripped and lowercased
first. An empty prediction, or no human answers, gives 0 for all three.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher

_TOKEN = re.compile(r"[a-z0-9]+")
FIELDS = ("vqa_rel_token_f1", "vqa_rel_edit_sim", "vqa_rel_score")


def relevance(prediction: str, human_answers: Sequence[str]) -> dict[str, float]:
    """The three relevance fields of one prediction, keyed by their record names (see the module doc)."""
    prediction = prediction.strip().lower()
    answers = [answer.strip().lower() for answer in human_answers]
    if not prediction or not answers:
        return dict.fromkeys(FIELDS, 0.0)
    f1 = max(token_f1(prediction, answer) for answer in answers)
    edit = max(edit_similarity(prediction, answer) for answer in answers)
    return {"vqa_rel_token_f1": f1, "vqa_rel_edit_sim": edit, "vqa_rel_score": max(f1, edit)}


def token_f1(prediction: str, answer: str) -> float:
    """F1 of the multiset overlap of the two texts' `[a-z0-9]+` tokens; 0 when either has none."""
    predicted, expected = _TOKEN.findall(prediction.lower()), _TOKEN.findall(answer.lower())
    if not predicted or not expected:
        return 0.0
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def edit_similarity(prediction: str, answer: str) -> float:
    """difflib's similarity ratio of the two strings (2 * matched characters / total characters)."""
    return SequenceMatcher(None, prediction, answer).ratio()
