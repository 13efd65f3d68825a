"""The one interface every VQA backend offers: a batch of few-shot prompts in, one answer per prompt out.

A backend knows nothing of pointers, journals or metrics. `generate` takes any number of prompts
(candidates of many queries), batches them internally, and returns one `Generation` per prompt in
the same order. A prompt whose image cannot be read, or whose generation fails even when retried
alone, gets `Generation(error=...)`; the others go on. A model that cannot be loaded is an
`InputError` from the loader, before any work.

What is not a prompt's fault never becomes a failed candidate (`BatchRunner`): out of memory
halves the batch, and with a single prompt stops the run (`DeviceOutOfMemory`, an InputError
naming the settings to change); a broken accelerator stops it at once (`AcceleratorFailure`), and
so do batches that keep failing whole (`RepeatedBatchFailures`). Both are `GenerationAborted`:
the generator lets them through, and its journal keeps every query finished before.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from lever_lm.errors import InputError, short_error
from lever_lm.vqa.postprocess import postprocess_generation
from lever_lm.vqa.prompts import FewShotPrompt

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Generation:
    """A prompt's outcome: the decoded new text, its post-processed answer, or why there is none.

    `reply_logprobs`, when replies were asked for: for each, in order, the natural log of the
    teacher-forced probability that the assistant's reply is exactly that string followed by the
    end-of-turn token, in the very prompt the answer was generated from. None when not asked, or
    when the chat template does not let the reply's tokens be told apart (a warning says so).
    """

    raw: str  # decoded new text ("" on failure)
    answer: str  # post-processed (docs/formats.md §5)
    error: str | None = None  # reason when the image was unreadable or generation failed
    reply_logprobs: tuple[float, ...] | None = None

    @classmethod
    def from_raw(cls, raw: str, reply_logprobs: tuple[float, ...] | None = None) -> Generation:
        return cls(raw=raw, answer=postprocess_generation(raw), reply_logprobs=reply_logprobs)

    @classmethod
    def failed(cls, reason: str) -> Generation:
        return cls(raw="", answer="", error=reason)


@dataclass(frozen=True)
class ReplyScores:
    """A prompt's replies scored by teacher forcing alone (no generation): for each reply, in order,
    the natural log of its probability (its tokens and the end-of-turn token, as in
    `Generation.reply_logprobs`) and how many tokens that is; or why there are none."""

    logprobs: tuple[float, ...] = ()
    token_counts: tuple[int, ...] = ()
    error: str | None = None

    @classmethod
    def failed(cls, reason: str) -> ReplyScores:
        return cls(error=reason)


class VQABackend(Protocol):
    """What the RL generator codes against."""

    name: str

    @property
    def batch_size(self) -> int:
        """Prompts per generate call; the generator cuts its chunks of candidates by it."""
        ...

    def generate(
        self, prompts: Sequence[FewShotPrompt], replies: Sequence[Sequence[str] | None] | None = None
    ) -> list[Generation]:
        """One Generation per prompt, same order; batches internally by `batch_size`.

        `replies`, one entry per prompt (None: none): the strings whose log-probabilities the prompt's
        Generation carries in `reply_logprobs`. Asking for them never changes an answer.
        """
        ...

    def score_replies(self, prompts: Sequence[FewShotPrompt], replies: Sequence[Sequence[str]]) -> list[ReplyScores]:
        """One ReplyScores per prompt, same order: the teacher-forced likelihood of each of
        `replies[i]` after `prompts[i]` (the path `generate` uses for `reply_logprobs`), without
        generating; batched like `generate`, a failing prompt fails alone."""
        ...

    def prefetch(self, prompts: Sequence[FewShotPrompt]) -> None:
        """Prepare the prompts' images ahead of `generate` (a speed-up only: answers do not change)."""
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
    """The config's dtype if it names one; else bfloat16 on a CUDA device that computes in it natively,
    float16 on an older one (bf16 is emulated there, and slow), float32 elsewhere. Described on a
    machine without CUDA (a merge of GPU shards, say), a CUDA device is taken to compute in bfloat16."""
    if name is None:
        if device.type != "cuda":
            return torch.float32
        if not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        log.warning(
            "%s has no native bfloat16: using float16 (Qwen2 activations can overflow in float16; "
            "set vqa_model.dtype: float32 if answers look broken)",
            torch.cuda.get_device_name(device),
        )
        return torch.float16
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


def bind_device(device: torch.device) -> None:
    """Make `device` the process's current CUDA device, so that library code using "the current device"
    opens no stray context on GPU 0 (one shard process per GPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


# -- failures that stop the run ---------------------------------------------------------------------


class GenerationAborted(RuntimeError):
    """The run must stop: going on would journal failures of the machine as failures of the candidates.

    Every query journaled before stays journaled; a rerun resumes after the cause is fixed.
    """


class AcceleratorFailure(GenerationAborted):
    """The accelerator failed (a CUDA error, a device-side assert, an ECC fault). Such an error breaks
    the process's CUDA context, so every later call would fail the same way."""


class RepeatedBatchFailures(GenerationAborted):
    """Every prompt of several consecutive batches failed: the cause is not in the prompts."""


class DeviceOutOfMemory(InputError):
    """Out of memory with a single prompt: a setting must change (the message names them)."""

    def __init__(self, problem: str):
        super().__init__(None, problem)


ACCELERATOR_ERROR_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "uncorrectable ECC error",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
)


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or a runtime error saying so (cuBLAS workspaces, MPS)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def is_accelerator_failure(error: BaseException) -> bool:
    """An error of the device itself rather than of one prompt (out of memory is not one)."""
    if not isinstance(error, RuntimeError) or is_out_of_memory(error):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return any(marker in str(error) for marker in ACCELERATOR_ERROR_MARKERS)


def release_memory(device: torch.device) -> None:
    """After an out-of-memory failure: collect the failed call's garbage first, then hand the
    cached blocks back, so that the retries have them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- running batches --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failed:
    """A prompt whose model call failed on its own (a string, not the exception: a traceback would
    keep the failed call's tensors alive)."""

    reason: str


MAX_FAILED_BATCHES = 3  # the circuit breaker: this many consecutive batches with every prompt failed ...
MIN_FAILED_PROMPTS = 32  # ... holding at least this many prompts (a query whose own image is broken fails ~10)


class BatchRunner:
    """Runs a backend's model calls so that only a prompt's own failure fails it.

    - Out of memory: the batch is halved (recursively) and the smaller size is kept for the rest of
      the run (logged once per reduction). Out of memory with a single prompt is `DeviceOutOfMemory`,
      naming the settings to change: a candidate never scores 0 because memory ran out.
    - An accelerator failure is `AcceleratorFailure` at once: the run stops, and the journal keeps
      what finished.
    - Any other failure of a batch: each prompt is retried alone, and only the culprit fails.
    - The circuit breaker (`observe`): when every prompt of MAX_FAILED_BATCHES consecutive batches
      failed, the run stops with `RepeatedBatchFailures` and the first error.

    The halves and the one-by-one retries are batch compositions of their own: exact on CPU in
    float32, but on a GPU in bfloat16 a prompt's answer can depend on its batch-mates.
    """

    def __init__(
        self,
        device: torch.device,
        batch_size: int,
        *,
        on_out_of_memory: Callable[[], None] | None = None,
        memory_advice: Callable[[], str] = lambda: "",
        max_failed_batches: int = MAX_FAILED_BATCHES,
        min_failed_prompts: int = MIN_FAILED_PROMPTS,
    ):
        self.device = device
        self.batch_size = batch_size
        self._on_out_of_memory = on_out_of_memory
        self._memory_advice = memory_advice
        self.max_failed_batches = max_failed_batches
        self.min_failed_prompts = min_failed_prompts
        self._failed_batches = 0
        self._failed_prompts = 0
        self._first_failure: str | None = None

    def run_with_retry(self, items: Sequence[T], run: Callable[[list[T]], Sequence[R]]) -> list[R | Failed]:
        """`run` over `items` in batches of the current batch size; one outcome per item, same order."""
        items = list(items)
        outcomes: list[R | Failed] = []
        while len(outcomes) < len(items):
            outcomes.extend(self._run_batch(items[len(outcomes) : len(outcomes) + self.batch_size], run))
        return outcomes

    def call(self, work: Callable[[], R]) -> R:
        """One call that is not a batch (an image through the vision tower): an accelerator failure
        stops the run; out of memory frees memory, including `on_out_of_memory` (the backend shrinks
        its image cache, where memory stays), and retries once, then is `DeviceOutOfMemory`. Other
        errors are the caller's."""
        for attempt in range(2):
            reason = None
            try:
                return work()
            except Exception as error:  # noqa: BLE001 -- sorted below; the rest is re-raised
                if is_accelerator_failure(error):
                    raise AcceleratorFailure(accelerator_message(error)) from error
                if not is_out_of_memory(error):
                    raise
                reason = short_error(error)
            self._free_memory()  # outside the except block: the traceback is gone
            if attempt == 1:
                raise DeviceOutOfMemory(self._out_of_memory_message(reason, "preparing one image"))
        raise AssertionError("unreachable")

    def observe(self, errors: Sequence[str | None]) -> None:
        """The circuit breaker: feed it each batch's per-prompt errors (None = success)."""
        if not errors:
            return
        if any(error is None for error in errors):
            self._failed_batches = self._failed_prompts = 0
            self._first_failure = None
            return
        self._first_failure = self._first_failure or errors[0]
        self._failed_batches += 1
        self._failed_prompts += len(errors)
        if self._failed_batches >= self.max_failed_batches and self._failed_prompts >= self.min_failed_prompts:
            raise RepeatedBatchFailures(
                f"every prompt of the last {self._failed_batches} batches ({self._failed_prompts} prompts) failed, "
                f"so the cause is not in the prompts; the first error: {self._first_failure}. Stopped; the queries "
                "journaled so far are kept, and a rerun resumes after the cause is fixed"
            )

    def _run_batch(self, batch: list[T], run: Callable[[list[T]], Sequence[R]]) -> list[R | Failed]:
        failure = None
        try:
            return list(run(batch))
        except Exception as error:  # noqa: BLE001 -- a prompt's failure must not stop the other candidates
            if is_accelerator_failure(error):
                raise AcceleratorFailure(accelerator_message(error)) from error
            failure = (is_out_of_memory(error), short_error(error))
        # Past the except block, the traceback and the failed call's tensors are released.
        out_of_memory, reason = failure
        release_memory(self.device)
        if out_of_memory:
            if len(batch) == 1:
                raise DeviceOutOfMemory(self._out_of_memory_message(reason, "a single prompt"))
            smaller = min(self.batch_size, (len(batch) + 1) // 2)
            if smaller < self.batch_size:
                log.warning(
                    "out of memory with %d prompts per batch (%s); using %d per batch for the rest of the run",
                    len(batch),
                    reason,
                    smaller,
                )
                self.batch_size = smaller
            return self.run_with_retry(batch, run)
        if len(batch) == 1:
            return [Failed(f"generation failed: {reason}")]
        log.warning("a batch of %d prompts failed (%s); retrying them one by one", len(batch), reason)
        return [outcome for item in batch for outcome in self._run_batch([item], run)]

    def _free_memory(self) -> None:
        release_memory(self.device)
        if self._on_out_of_memory is not None:
            self._on_out_of_memory()
            release_memory(self.device)

    def _out_of_memory_message(self, reason: str, what: str) -> str:
        advice = self._memory_advice()
        return (
            f"out of memory on {self.device} with {what} ({reason}); the batch cannot shrink further. "
            f"Free the device or lower what the run keeps on it{': ' + advice if advice else ''}. "
            "The queries journaled so far are kept; a rerun resumes"
        )


def accelerator_message(error: BaseException) -> str:
    """What an `AcceleratorFailure` says (the backends' and the pointer's alike)."""
    return (
        f"the accelerator failed ({short_error(error)}); every later call on it would fail too, so the run stops "
        "here. The queries journaled so far are kept: fix or change the device, then rerun to resume"
    )
