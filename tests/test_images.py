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


# -- large images are decoded within a pixel cap -------------------------------------------------


@pytest.mark.parametrize(
    "size, fmt, mode, expected",
    [
        ((5000, 4000), "PNG", "RGB", (2500, 2000)),  # 20 M pixels: reduced 2x after decoding
        ((9000, 2000), "PNG", "P", (4500, 1000)),  # a palette image (not reducible as such)
        ((6000, 5000), "JPEG", "RGB", (3000, 2500)),  # decoded at 1/2 scale by the JPEG decoder
        ((640, 480), "JPEG", "RGB", (640, 480)),  # COCO-sized: untouched
    ],
)
def test_large_images_are_decoded_within_the_pixel_cap(tmp_path, size, fmt, mode, expected):
    from lever_lm.vqa.images import MAX_DECODED_PIXELS

    path = tmp_path / f"big.{fmt.lower()}"
    image = Image.new("RGB", size, (200, 30, 90))
    (image.convert("P", dither=Image.Dither.NONE) if mode == "P" else image).save(path, fmt)
    decoded = read_rgb(path)
    assert decoded.size == expected and decoded.mode == "RGB"
    assert decoded.width * decoded.height <= MAX_DECODED_PIXELS
    with Image.open(path) as plain:
        colour = plain.convert("RGB").getpixel((0, 0))
        if size == (640, 480):
            assert decoded.tobytes() == plain.convert("RGB").tobytes(), "an image within the cap is decoded as before"
    assert all(abs(a - b) <= 2 for a, b in zip(decoded.getpixel((10, 10)), colour))


MEASURE_PEAK = """
import resource, sys, threading
from pathlib import Path
from lever_lm.vqa.images import read_rgb
paths = [Path(p) for p in sys.argv[1:]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
threads = [threading.Thread(target=read_rgb, args=(p,)) for p in paths]  # as the prefetch threads do
for t in threads:
    t.start()
for t in threads:
    t.join()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_reading_large_solid_pngs_in_threads_holds_one_full_size_image_at_a_time(tmp_path):
    """Three 8000 x 6000 PNGs (192 MB each decoded, 100 KB on disk) read at once, as a prefetch does.
    Uncapped, each is decoded and then converted at full size (2x one image even when the threads do
    not overlap, 5.5x measured when they do); capped, one at a time is decoded, then reduced 2x before
    conversion (1.25x)."""
    import subprocess
    import sys

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8000, 6000), (i, 100, 200)).save(paths[-1])
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, *map(str, paths)], check=True, capture_output=True, text=True
    )
    full_size = 8000 * 6000 * 4  # Pillow holds RGB in 4 bytes a pixel
    assert int(out.stdout) < 1.8 * full_size
