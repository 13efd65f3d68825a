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
    """A prompt's outcome: the decoded new text, its post-processed answer, or why there is none."""

    raw: str  # decoded new text ("" on failure)
    answer: str  # post-processed (docs/formats.md §5)
    error: str | None = None  # reason when the image was unreadable or generation failed

    @classmethod
    def from_raw(cls, raw: str) -> Generation:
        return cls(raw=raw, answer=postprocess_generation(raw))

    @classmethod
    def failed(cls, reason: str) -> Generation:
        return cls(raw="", answer="", error=reason)


class VQABackend(Protocol):
    """What the RL generator codes against."""

    name: str

    @property
    def batch_size(self) -> int:
        """Prompts per generate call; the generator cuts its chunks of candidates by it."""
        ...

    def generate(self, prompts: Sequence[FewShotPrompt]) -> list[Generation]:
        """One Generation per prompt, same order; batches internally by `batch_size`."""
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


def describe_numerics(device: str, dtype: str | None, attn_implementation: str | None = None) -> dict:
    """The numerics a run's answers depend on, for its fingerprint (described without the device,
    so that a merge can run on another machine): device type, effective dtype, attention
    implementation, torch and transformers versions. A run started on a CPU in float32 and resumed
    on a GPU in bfloat16 must not mix two behaviours in one file; the device index, the GPU model
    and the batch size are left out (rounding differences only)."""
    import transformers

    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise InputError(None, f"--device {device!r} is not a torch device: {error}") from None
    return {
        "device_type": device_type,
        "dtype": str(default_dtype(torch.device(device_type), dtype)).removeprefix("torch."),
        "attn_implementation": attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


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
