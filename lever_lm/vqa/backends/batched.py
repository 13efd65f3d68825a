"""What every VQA backend shares: batches of prompts, failures that are not a prompt's fault, and the
per-image cache with its prefetch.

A backend subclass says how one prompt is prepared (`_prepare`: its text and its images as the
cache holds them), how a batch of prepared prompts becomes answers (`_generate_texts`: one
`Generation` each), and what the cache keeps per image (`_process_image`, host-side and
thread-safe; `_image_entry`, on the device: e.g. vision features). This class does the rest:

* `generate` cuts the prompts into batches of `batch_size` and hands each to the `BatchRunner`:
  out of memory halves the batch, an accelerator error stops the run, a failing prompt fails alone,
  whole batches failing trip the circuit breaker (`base.BatchRunner`);
* `score_replies` batches the same way, with `_score_texts` in place of `_generate_texts`: the
  replies' teacher-forced likelihoods alone, no generation (InfoScore needs only those);
* an unreadable image fails only the prompts that show it;
* `prefetch` prepares a block's new images before `generate` needs them: reading, decoding and
  `_process_image` in threads, `_image_entry` one image at a time in first-use order (so an
  image's entry never depends on which other images were prepared with it); it also logs where
  the previous block's time went.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lever_lm.vqa.backends.base import (
    BatchRunner,
    DeviceOutOfMemory,
    Failed,
    Generation,
    GenerationAborted,
    ReplyScores,
)
from lever_lm.vqa.backends.memory import resolve_memory_settings
from lever_lm.vqa.images import ImageCache, UnreadableImage, nbytes
from lever_lm.vqa.model_config import VQAModelSettings
from lever_lm.vqa.prompts import FewShotPrompt

log = logging.getLogger(__name__)

PREFETCH_CACHE_SHARE = 0.9  # a prefetch fills the cache up to this share, leaving room for generate's misses


@dataclass
class WorkTimes:
    """Where a block's time went, for the log: host-side image work (read, decode, processor;
    CPU-seconds summed over the prefetch threads), the vision tower, and the generate calls."""

    prompts: int = 0
    images: int = 0  # through the vision tower
    prefetched: int = 0
    prepare_s: float = 0.0
    tower_s: float = 0.0
    generate_s: float = 0.0
    prefetch_s: float = 0.0  # wall time of the prefetch calls

    def report(self, cache: ImageCache) -> str:
        rate = cache.hit_rate
        return (
            f"{self.prompts} prompts: image cache {len(cache)} images, {cache.bytes / 2**20:.0f} of "
            f"{cache.max_bytes / 2**20:.0f} MB, hit rate {'-' if rate is None else f'{rate:.0%}'}; "
            f"{self.images} images through the tower ({self.prefetched} ahead of use); "
            f"prepare {self.prepare_s:.1f} s (CPU), tower {self.tower_s:.1f} s, generate {self.generate_s:.1f} s"
        )


def _run_ahead(pool: ThreadPoolExecutor, work: Callable, items: Sequence, depth: int) -> Iterator[Future]:
    """`pool.submit(work, item)` for each item, in order, at most `depth` running ahead of the consumer."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) > depth:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


class BatchedBackend:
    """The shared machinery of the backends (see the module doc); subclasses fill in the hooks below."""

    def __init__(self, name: str, model, settings: VQAModelSettings, device: torch.device, model_path: Path):
        self.name = name
        self.model = model
        self.settings = settings = resolve_memory_settings(settings, model, device)  # batch size, cache budget
        self.device = device
        self.model_path = model_path
        self.image_cache = ImageCache(self._prepare_image, max_bytes=settings.image_cache_mb * 2**20)
        self.batch_runner = BatchRunner(
            device, settings.batch_size, on_out_of_memory=self._shrink_image_cache, memory_advice=self._memory_advice
        )
        self.work = WorkTimes()

    # -- the interface -------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[FewShotPrompt], replies: Sequence[Sequence[str] | None] | None = None
    ) -> list[Generation]:
        """One Generation per prompt, same order, `settings.batch_size` prompts per generate call.

        `replies[i]`: the strings whose log-probabilities `prompts[i]`'s Generation carries in
        `reply_logprobs` (see `base.Generation`); the answers are the same with or without them.
        """
        if replies is not None and len(replies) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} lists of replies")
        return self._run_chunks(prompts, replies, self._generate_texts, Generation.failed)

    def score_replies(self, prompts: Sequence[FewShotPrompt], replies: Sequence[Sequence[str]]) -> list[ReplyScores]:
        """One ReplyScores per prompt, same order: each reply's teacher-forced log-probability, without
        generating (`_score_texts`); batches, failures and the image cache as in `generate`."""
        if len(replies) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} lists of replies")
        return self._run_chunks(prompts, replies, self._score_texts, ReplyScores.failed)

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    # -- batching ------------------------------------------------------------------------------

    def _run_chunks(self, prompts: Sequence[FewShotPrompt], replies, run: Callable, failed: Callable) -> list:
        """`run` (one outcome per prepared prompt) over chunks of `batch_size` prompts; `failed(reason)`
        for a prompt that could not be prepared or run."""
        results: list = [None] * len(prompts)
        size = self.batch_size
        for start in range(0, len(prompts), size):
            self._run_chunk(prompts, range(start, min(start + size, len(prompts))), results, replies, run, failed)
        return results

    def _run_chunk(self, prompts, indices: range, results: list, replies, run: Callable, failed: Callable) -> None:
        ready: list[tuple[int, Any]] = []  # (prompt index, what `_prepare` made of it)
        for i in indices:
            try:
                ready.append((i, self._prepare(prompts[i], None if replies is None else replies[i])))
            except UnreadableImage as error:
                results[i] = failed(str(error))
            except (GenerationAborted, DeviceOutOfMemory):
                raise
            except Exception as error:  # noqa: BLE001 -- e.g. an image the processor rejects: this prompt only
                results[i] = failed(f"preparing the prompt failed: {type(error).__name__}: {error}")
        if ready:
            started = time.perf_counter()
            outcomes = self.batch_runner.run_with_retry([prepared for _, prepared in ready], run)
            self.work.generate_s += time.perf_counter() - started
            for (i, _), outcome in zip(ready, outcomes):
                results[i] = failed(outcome.reason) if isinstance(outcome, Failed) else outcome
        self.work.prompts += len(indices)
        self.batch_runner.observe([results[i].error for i in indices])

    # -- images ------------------------------------------------------------------------------------

    def prefetch(self, prompts: Sequence[FewShotPrompt]) -> None:
        """Prepare the prompts' images that are not cached yet, before `generate` needs them.

        The generator calls this after proposing a block. Reading and processing (CPU) run in
        `settings.prefetch_threads` threads, a few images ahead of the vision tower, which takes each
        image alone in first-use order: an image's features are the same as when `generate` prepares
        it. Only as many images as the cache holds are prepared; a failure is left for `generate`,
        which meets it again and fails that prompt. Also logs the previous block's work (`WorkTimes`).
        """
        if self.work.prompts:
            log.info("%s", self.work.report(self.image_cache))
            self.work = WorkTimes()
        paths = self.image_cache.missing(path for prompt in prompts for path in prompt.images)
        if not paths or self.settings.prefetch_threads == 0 or self.image_cache.max_bytes == 0:
            return
        started = time.perf_counter()
        kept = kept_bytes = 0
        with ThreadPoolExecutor(self.settings.prefetch_threads, thread_name_prefix="image-prefetch") as pool:
            ahead = _run_ahead(pool, self._read_and_process, paths, depth=2 * self.settings.prefetch_threads)
            for path, future in zip(paths, ahead):
                try:
                    processed, seconds = future.result()
                except UnreadableImage as error:
                    self.image_cache.remember_unreadable(path, str(error))
                    continue
                except Exception:  # noqa: BLE001 -- e.g. an image the processor rejects: generate reports it
                    continue
                self.work.prepare_s += seconds
                entry = self._tower(processed)
                if entry is None:  # out of memory: the cache was shrunk; generate prepares the rest
                    break
                size = nbytes(entry)
                if kept_bytes + size > self.image_cache.max_bytes * PREFETCH_CACHE_SHARE:
                    break  # more would evict what this block is about to use (older blocks' images go first)
                self.image_cache.put(path, entry)
                kept, kept_bytes = kept + 1, kept_bytes + size
        self.work.prefetched += kept
        self.work.prefetch_s += time.perf_counter() - started

    def _prepare_image(self, image):
        """What the cache keeps per image (the cache calls this on a miss)."""
        started = time.perf_counter()
        processed = self._process_image(image)
        self.work.prepare_s += time.perf_counter() - started
        return self.batch_runner.call(lambda: self._timed_entry(processed))

    def _read_and_process(self, path: Path):
        """In a prefetch thread: the decoded, processed image and the seconds it took."""
        started = time.perf_counter()
        processed = self._process_image(self.image_cache.read(path))
        return processed, time.perf_counter() - started

    def _tower(self, processed):
        """`_image_entry` with the memory rules of `generate`; None when memory ran out (cache shrunk)."""
        try:
            return self.batch_runner.call(lambda: self._timed_entry(processed))
        except DeviceOutOfMemory:
            return None

    def _timed_entry(self, processed):
        started = time.perf_counter()
        entry = self._image_entry(processed)
        self.work.tower_s += time.perf_counter() - started
        self.work.images += 1
        return entry

    def _shrink_image_cache(self) -> None:
        before = self.image_cache.max_bytes
        self.image_cache.shrink()
        log.warning(
            "out of memory: image cache budget %d -> %d MB (set vqa_model.image_cache_mb to choose it)",
            before // 2**20,
            self.image_cache.max_bytes // 2**20,
        )

    # -- what a backend fills in ------------------------------------------------------------------

    def _prepare(self, prompt: FewShotPrompt, replies: Sequence[str] | None = None) -> Any:
        """One prompt ready to batch: its text, its images from `self.image_cache`, its replies' tokens."""
        raise NotImplementedError

    def _generate_texts(self, batch: list) -> list[Generation]:
        """One `Generation` per prepared prompt of the batch, same order."""
        raise NotImplementedError

    def _score_texts(self, batch: list) -> list[ReplyScores]:
        """One `ReplyScores` per prepared prompt of the batch (its replies' tokens prepared), same order."""
        raise NotImplementedError

    def _process_image(self, image):
        """The host-side work on a decoded image (thread-safe: prefetch runs it in threads); here none."""
        return image

    def _image_entry(self, processed):
        """What the cache keeps per image, from `_process_image`'s result: here the decoded picture."""
        return processed

    def _memory_advice(self) -> str:
        return (
            f"vqa_model.image_cache_mb (now {self.image_cache.max_bytes // 2**20} MB) or vqa_model.dtype; "
            "--batch_size is already down to 1"
        )
