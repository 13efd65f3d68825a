"""Post-processing of raw generations (docs/formats.md §5): cut at the next block, then at the first ", "."""

from __future__ import annotations

import pytest

from lever_lm.vqa.postprocess import postprocess_generation


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        ("red", "red"),
        (" red ", "red"),
        ("red\nQuestion: What shape is it? Short answer: circle", "red"),  # the next ICD-style block
        ("blue Short answer: red", "blue"),
        ("yes Answer: no", "yes"),
        ("two, three, four", "two"),  # alternatives after ", "
        ("1,000", "1,000"),  # a comma without a space is kept
        ("Short answer: red", ""),  # nothing before the marker
        ("hot dog, Question", "hot dog"),
        ("", ""),
        ("a book", "a book"),  # articles are the metric's business, not this one's
    ],
)
def test_postprocess(raw, answer):
    assert postprocess_generation(raw) == answer
