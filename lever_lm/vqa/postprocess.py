"""Post-processing of a VQA generation into the answer that gets scored (docs/formats.md §5).

A few-shot prompt invites the model to go on after its answer with the next
`Question:... Short answer:...` block, or to list alternatives; both would spoil an exact-match
metric. So, as in OpenFlamingo's VQA evaluation: keep the text before the first `Question`,
`Answer` or `Short`, then before the first `", "`; outer whitespace is dropped.
"""

from __future__ import annotations

import re

_NEXT_BLOCK = re.compile("Question|Answer|Short")


def postprocess_generation(raw: str) -> str:
    """The answer part of a raw generation (see the module doc)."""
    answer = _NEXT_BLOCK.split(raw, maxsplit=1)[0]
    answer = answer.split(", ", 1)[0]
    return answer.strip()
