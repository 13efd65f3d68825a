"""The per-image cache: prepared once, least recently used out beyond the byte budget, failures remembered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lever_lm.vqa.images import ImageCache, UnreadableImage, nbytes, read_rgb


def test_lru_within_byte_budget(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("L", (4, 4), color=i).save(paths[-1])
    prepared = []

    def prepare(image):
        prepared.append(image.getpixel((0, 0)))
        return torch.zeros(4)  # 16 bytes

    cache = ImageCache(prepare, max_bytes=32)
    for path in (paths[0], paths[1], paths[0], paths[2], paths[0], paths[1]):
        cache.get(path)
    # 0 and 1 fit; 2 evicts 1 (0 was used more recently); asking for 1 again re-prepares it.
    assert prepared == [(0, 0, 0), (1, 1, 1), (2, 2, 2), (1, 1, 1)]
    assert (cache.hits, cache.misses, len(cache), cache.bytes) == (2, 4, 2, 32)
    assert paths[0] in cache and paths[1] in cache and paths[2] not in cache


def test_unreadable_images_fail_with_the_reason_and_are_not_reread(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    reads = []

    def read(path: Path):
        reads.append(path)
        return read_rgb(path)

    cache = ImageCache(lambda image: image, max_bytes=1 << 20, read=read)
    for _ in range(2):
        with pytest.raises(UnreadableImage, match="broken.jpg: cannot read image"):
            cache.get(broken)
    assert reads == [broken]
    with pytest.raises(UnreadableImage, match="image file not found"):
        cache.get(tmp_path / "missing.jpg")


def test_sizes_and_rgb(tmp_path):
    image = Image.new("L", (3, 2))
    image.save(tmp_path / "grey.png")
    assert read_rgb(tmp_path / "grey.png").mode == "RGB"
    assert nbytes(image) == 6 and nbytes({"a": torch.zeros(2, dtype=torch.float64), "b": (torch.zeros(1),)}) == 20
