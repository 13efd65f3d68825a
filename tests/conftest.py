"""Shared fixtures: the demo data set and tiny models, built once per test session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lever_lm.demo.build import build_demo  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A freshly built demo (seed 0): `vqa/` data set and `models/` tiny CLIP and Qwen2.5-VL."""
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, seed=0)
    return out
