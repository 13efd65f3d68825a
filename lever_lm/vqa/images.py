"""Per-image cache for the VQA backends: each distinct image is read and prepared once, not per candidate.

Every query is scored with ~10 candidate prompts; all show the query image and many share ICD
images. Reading a COCO JPEG, resizing and normalising it, and (for Qwen2.5-VL) running the vision
tower on it cost as much per occurrence as the first time, so a backend keeps what it derived
from an image -- a decoded picture, processed pixels, or vision features -- keyed by the file
path, in an LRU cache bounded in bytes (vision features of a 3B model are ~1.6 MB per COCO image).

An unreadable image is remembered too: every prompt that shows it fails at once with the same
reason, without touching the disk again.

A backend may also fill the cache ahead of use (`missing`, `put`, `remember_unreadable`: its
prefetch reads and processes a block's images in threads), and shrink it when the device runs out
of memory (`shrink`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

import torch
from PIL import Image

from lever_lm.data.vqa import read_rgb_image
from lever_lm.errors import InputError

T = TypeVar("T")


class UnreadableImage(Exception):
    """An image file that cannot be read; the message names the file and the reason."""


# Images are decoded into at most this many pixels (a 4096 x 4096 square, 48 MB as RGB): above every
# size a backend feeds its model (Qwen2.5-VL resizes to at most 12.8 M pixels by default, CLIP and
# OpenFlamingo to 224 x 224), so COCO-sized images (640 x 480) and anything a model sees whole are
# decoded exactly; a 12000 x 12000 PNG is reduced 3x right after decoding instead of being converted,
# cached and processed at 144 M pixels.
MAX_DECODED_PIXELS = 4096 * 4096


def read_rgb(path: Path) -> Image.Image:
    """The data set's reader (whole file decoded now, as RGB, within MAX_DECODED_PIXELS); its
    InputError becomes a per-prompt failure."""
    try:
        return read_rgb_image(path, max_pixels=MAX_DECODED_PIXELS)
    except InputError as error:
        raise UnreadableImage(str(error)) from None


def nbytes(value: object) -> int:
    """Approximate memory of a cached value: tensors (possibly nested in tuples, dicts or dataclasses)
    or a PIL image."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return sum(nbytes(item) for item in value)
    return 0


class ImageCache(Generic[T]):
    """path -> `prepare(decoded RGB image)`, least recently used first out beyond `max_bytes`.

    Read failures are remembered (`UnreadableImage` again on the next `get`); errors of `prepare`
    itself (e.g. out of memory) are not, since retrying later may succeed.
    """

    def __init__(
        self, prepare: Callable[[Image.Image], T], max_bytes: int, read: Callable[[Path], Image.Image] = read_rgb
    ):
        self._prepare = prepare
        self._read = read
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, tuple[T, int]] = OrderedDict()
        self._failures: dict[Path, str] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, path: Path) -> T:
        path = Path(path)
        entry = self._entries.get(path)
        if entry is not None:
            self._entries.move_to_end(path)
            self.hits += 1
            return entry[0]
        if path in self._failures:
            raise UnreadableImage(self._failures[path])
        self.misses += 1
        try:
            image = self._read(path)
        except UnreadableImage as error:
            self._failures[path] = str(error)
            raise
        value = self._prepare(image)
        self._store(path, value)
        return value

    def missing(self, paths: Iterable[Path]) -> list[Path]:
        """The distinct paths, in first-use order, that are neither cached nor known to be unreadable."""
        seen: dict[Path, None] = {}
        for path in map(Path, paths):
            if path not in self._entries and path not in self._failures:
                seen.setdefault(path, None)
        return list(seen)

    def read(self, path: Path) -> Image.Image:
        """The decoded image (no caching, no counters; thread-safe): for a prefetch."""
        return self._read(Path(path))

    def put(self, path: Path, value: T) -> None:
        """Keep a value prepared ahead of use (LRU rules as for `get`)."""
        path = Path(path)
        if path in self._entries:
            return
        self._store(path, value)

    def remember_unreadable(self, path: Path, reason: str) -> None:
        self._failures[Path(path)] = reason

    def shrink(self) -> None:
        """Halve the budget and evict down to it: after the device ran out of memory."""
        self.max_bytes //= 2
        self._evict()

    @property
    def hit_rate(self) -> float | None:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None

    def clear(self) -> None:
        """Forget every entry and failure (counters too), e.g. between benchmark repeats."""
        self._entries.clear()
        self._failures.clear()
        self.bytes = self.hits = self.misses = 0

    def __contains__(self, path: Path) -> bool:
        return Path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _store(self, path: Path, value: T) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return  # larger than the whole budget: use once, keep nothing
        self._entries[path] = (value, size)
        self.bytes += size
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
