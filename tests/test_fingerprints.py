"""What keys a run's journal: prompt and model identity in, device and batch size out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lever_lm.errors import InputError
from lever_lm.vqa.backends import describe_settings


def test_vqa_settings_follow_the_prompt_and_the_model_not_the_batch(demo_dir: Path, tmp_path: Path):
    model = demo_dir / "models" / "qwen2.5-vl-tiny"
    base = describe_settings("qwen2.5_vl_3B", model_path=str(model), config={})
    assert base["generation"] == {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0, "do_sample": False}
    assert describe_settings("qwen2.5_vl_3B", model_path=str(model), config={"vqa_model": {"batch_size": 64}}) == base
    other_prompt = describe_settings("qwen2.5_vl_3B", model_path=str(model), config={"vqa_model": {"system_prompt": "Hi"}})
    assert other_prompt["prompt"]["system_prompt"] == "Hi" and other_prompt != base
    moved = shutil.copytree(model, tmp_path / "moved")
    assert describe_settings("qwen2.5_vl_3B", model_path=str(moved), config={})["model"] == base["model"]
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("64", "65", 1))
    assert describe_settings("qwen2.5_vl_3B", model_path=str(moved), config={})["model"] != base["model"]


def test_vqa_settings_fail_early_like_loading(tmp_path: Path):
    with pytest.raises(InputError, match="model directory not found"):
        describe_settings("qwen2.5_vl_3B", model_path=str(tmp_path / "none"), config={})
    with pytest.raises(InputError, match="flamingo_3B"):
        describe_settings("flamingo_3B", model_path=None, config={})
    with pytest.raises(InputError, match="needs --vqa_model_path"):
        describe_settings("hf_image_text_to_text", model_path=None, config={})
