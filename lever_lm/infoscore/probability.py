"""P(y | S, q): the VLM's probability of a query's answer after an ICD sequence, through a VQA backend.

The prompt is the one the RL generator scores candidates with (`prompts.build_prompt`: the ICDs
of S in order, each showing its answer, then the query), rendered by the backend exactly as for
generation. P is the lineage's: the geometric mean of the answer tokens' teacher-forced
probabilities, exp(log P(tokens) / number of tokens), from the backend's `score_replies` -- the
same teacher-forced reply likelihood that gives `vqa_gt_prob` (`reply_likelihood`).

Which tokens: the answer's and the end-of-turn token after it (`<|im_end|>` for chat VLMs,
`<|endofchunk|>` for OpenFlamingo, how the ICDs end their answers), taken from the real
tokenized conversation (`ChatEncoder.reply_tokens`: the tokens that follow the prompt's tokens
when the assistant answers y; what a chat template writes after the end-of-turn token, Qwen's
"\\n", is not counted). The end token makes P the probability of the answer being exactly y,
not merely starting with it ("2" would otherwise gain from prompts leading to "20"); the
lineage counts the join token `<|endofchunk|>` after a Flamingo answer too.

Which answer y: one string per query, as the lineage has (its `answer` column): the query's
`icd_answer`, the answer it shows as an ICD -- `multiple_choice_answer`, else the most frequent
raw answer (docs/formats.md §3.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lever_lm.data.vqa import VQADataset
from lever_lm.vqa.backends.base import VQABackend
from lever_lm.vqa.prompts import build_prompt


@dataclass
class AnswerProbability:
    """P(y | S, q) of one query for many S in one backend call (`search.Probability`); the first
    failure's reason is kept for the journal's stats."""

    backend: VQABackend
    dataset: VQADataset
    query: int
    first_failure: str | None = field(default=None, init=False)

    @property
    def answer(self) -> str:
        return self.dataset[self.query].icd_answer

    def __call__(self, sequences: Sequence[Sequence[int]]) -> list[float | None]:
        prompts = [build_prompt(self.dataset, self.query, icds) for icds in sequences]
        scored = self.backend.score_replies(prompts, [(self.answer,)] * len(prompts))
        out: list[float | None] = []
        for result in scored:
            if result.error is not None:
                self.first_failure = self.first_failure or result.error
                out.append(None)
            else:
                out.append(math.exp(result.logprobs[0] / result.token_counts[0]))
        return out
