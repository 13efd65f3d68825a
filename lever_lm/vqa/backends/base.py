"""The one interface every VQA backend offers: a batch of few-shot prompts in, one answer per prompt out.

A backend knows nothing of pointers, journals or metrics. `generate` takes any number of prompts
(candidates of many queries), batches them internally, and returns one `Generation` per prompt in
the same order. A prompt whose image cannot be read, or whose generation fails even when retried
alone, gets `Generation(error=...)`; the others go on. A model that cannot be loaded is an
`InputError` from the loader, before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from lever_lm.errors import InputError
from lever_lm.vqa.postprocess import postprocess_generation
from lever_lm.vqa.prompts import FewShotPrompt

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Generation:
    """A prompt's outcome: the decoded new text, its post-processed answer, or why there is none.

    `reply_logprobs`, when replies were asked for: for each, in order, the natural log of the
    teacher-forced probability that the assistant's reply is exactly that string followed by the
    end-of-turn token, in the very prompt the answer was generated from. None when not asked, or
    when the chat template does not let the reply's tokens be told apart (a warning says so).
    """

    raw: str  # decoded new text ("" on failure)
    answer: str  # post-processed (SPEC §5)
    error: str | None = None  # reason when the image was unreadable or generation failed
    reply_logprobs: tuple[float, ...] | None = None

    @classmethod
    def from_raw(cls, raw: str, reply_logprobs: tuple[float, ...] | None = None) -> Generation:
        return cls(raw=raw, answer=postprocess_generation(raw), reply_logprobs=reply_logprobs)

    @classmethod
    def failed(cls, reason: str) -> Generation:
        return cls(raw="", answer="", error=reason)


class VQABackend(Protocol):
    """What the RL generator codes against."""

    name: str

    def generate(
        self, prompts: Sequence[FewShotPrompt], replies: Sequence[Sequence[str] | None] | None = None
    ) -> list[Generation]:
        """One Generation per prompt, same order; batches internally by the backend's batch size.

        `replies`, one entry per prompt (None: none): the strings whose log-probabilities the prompt's
        Generation carries in `reply_logprobs`. Asking for them never changes an answer.
        """
        ...

    def describe(self) -> dict:
        """The settings that shape the answers (model, prompt, decoding), JSON-serialisable."""
        ...


def resolve_device(device: str) -> torch.device:
    """A torch device that exists here; a CUDA device that does not is an InputError, before loading."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InputError(None, f"--device {device!r} is not a torch device: {error}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise InputError(None, f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type not in ("cpu", "mps"):
        raise InputError(None, f"--device {device}: unsupported device type '{resolved.type}' (use cuda:N or cpu)")
    return resolved


def default_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere, unless the config names a dtype."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(None, f"config 'vqa_model.dtype': {name!r} is not a floating-point torch dtype")
    return dtype


def run_with_retry(items: list[T], run: Callable[[list[T]], list[str]], device: torch.device) -> list[str | Exception]:
    """`run(items)` as one batch; if the batch fails, each item alone, so only the culprit fails.

    Returns each item's decoded text, or the exception that its lone run raised.
    """
    try:
        return list(run(items))
    except Exception as error:  # noqa: BLE001 -- any model failure must not stop the other candidates
        if len(items) == 1:
            return [error]
        log.warning(
            "a batch of %d prompts failed (%s: %s); retrying them one by one", len(items), type(error).__name__, error
        )
    _release_memory(device)
    results: list[str | Exception] = []
    for item in items:
        try:
            results.append(run([item])[0])
        except Exception as error:  # noqa: BLE001
            _release_memory(device)
            results.append(error)
    return results


def _release_memory(device: torch.device) -> None:
    """After an out-of-memory failure the retries need the cached blocks back."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure_reason(error: Exception) -> str:
    return f"generation failed: {type(error).__name__}: {error}"
