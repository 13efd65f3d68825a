"""Few-shot VQA prompts: what a candidate ICD sequence becomes before the VQA model sees it (docs/formats.md §5).

A `FewShotPrompt` is model-neutral: the ICDs (image, question, answer) in prompt order, then the
query (image, question). A model family renders it with a `PromptTemplate`:

* chat VLMs (Qwen2.5-VL and other `AutoModelForImageTextToText` models): `chat_messages` -- an
  optional system turn and ONE user turn interleaving each ICD image with its filled ICD template,
  then the query image with the filled query template;
* OpenFlamingo: `flamingo_text` -- `<image>` + filled ICD template per ICD (the default template
  ends with `<|endofchunk|>`), then `<image>` + filled query template.

Templates hold the placeholders `{question}` and `{answer}`; anything else is literal text (so a
user template may contain braces), and a question containing "{answer}" is never re-substituted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lever_lm.data.vqa import VQADataset

_PLACEHOLDER = re.compile(r"\{(question|answer)\}")
FLAMINGO_IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Shot:
    """One image with its question, and its answer when it is an ICD (None for the query)."""

    image: Path
    question: str
    answer: str | None = None


@dataclass(frozen=True)
class FewShotPrompt:
    """ICDs in prompt order, then the query."""

    shots: tuple[Shot, ...]
    query: Shot

    @property
    def images(self) -> tuple[Path, ...]:
        """Every image of the prompt in the order the model sees them (ICDs, then the query)."""
        return tuple(shot.image for shot in self.shots) + (self.query.image,)


def build_prompt(
    dataset: VQADataset, query_idx: int, pointer: Sequence[int], query_dataset: VQADataset | None = None
) -> FewShotPrompt:
    """The few-shot prompt of one candidate: the ICDs of `pointer` in order (each with its
    `icd_answer`), then the query. ICD rows are training-split rows of `dataset`; the query is a
    row of `query_dataset` (another split, e.g. validation), by default of `dataset` too."""
    queries = dataset if query_dataset is None else query_dataset
    shots = tuple(Shot(dataset.image_path(i), dataset[i].question, dataset[i].icd_answer) for i in pointer)
    return FewShotPrompt(shots=shots, query=Shot(queries.image_path(query_idx), queries[query_idx].question))


@dataclass(frozen=True)
class PromptTemplate:
    """The text around the images: system prompt (chat models only) and the two templates."""

    system_prompt: str | None
    icd_template: str  # placeholders {question} and {answer}
    query_template: str  # placeholder {question}


def fill(template: str, question: str, answer: str | None = None) -> str:
    """Substitute `{question}` and `{answer}` in one pass (no other brace is special)."""
    values = {"question": question, "answer": "" if answer is None else answer}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def shot_texts(prompt: FewShotPrompt, template: PromptTemplate) -> list[str]:
    """The text after each image: filled ICD templates, then the filled query template."""
    texts = [fill(template.icd_template, shot.question, shot.answer) for shot in prompt.shots]
    return texts + [fill(template.query_template, prompt.query.question)]


def chat_messages(prompt: FewShotPrompt, template: PromptTemplate) -> list[dict]:
    """The chat of a chat VLM: [system,] one user turn of image, text, image, text, ..., query.

    Image entries carry the file path for readability; backends pass the pixels separately, and
    chat templates only look at the entry type.
    """
    content: list[dict] = []
    for image, text in zip(prompt.images, shot_texts(prompt, template)):
        content.append({"type": "image", "image": str(image)})
        content.append({"type": "text", "text": text})
    messages = []
    if template.system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": template.system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def flamingo_text(prompt: FewShotPrompt, template: PromptTemplate, escape: Callable[[str], str] = str) -> str:
    """The OpenFlamingo prompt string; its `<image>` markers match `prompt.images` in order.

    `escape` is applied to every question and answer (not to the template, whose `<|endofchunk|>`
    is meant): the backend's control-token escape, so that a question holding `<image>` adds no image.
    """
    escaped = FewShotPrompt(
        shots=tuple(
            Shot(s.image, escape(s.question), None if s.answer is None else escape(s.answer)) for s in prompt.shots
        ),
        query=Shot(prompt.query.image, escape(prompt.query.question)),
    )
    return "".join(FLAMINGO_IMAGE_TOKEN + text for text in shot_texts(escaped, template))
