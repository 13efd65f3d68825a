"""What keys a run's journal: model content, prompt and numerics in; paths, device index and batch size out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lever_lm.errors import InputError
from lever_lm.vqa.backends import describe_settings


def describe(model: Path, config: dict | None = None, device: str = "cpu") -> dict:
    return describe_settings("qwen2.5_vl_3B", model_path=str(model), config=config or {}, device=device)


def test_vqa_settings_follow_the_prompt_and_the_numerics_not_the_batch(demo_dir: Path):
    model = demo_dir / "models" / "qwen2.5-vl-tiny"
    base = describe(model)
    assert base["generation"] == {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0, "do_sample": False}
    assert base["numerics"]["dtype"] == "float32" and base["numerics"]["device_type"] == "cpu"
    assert base["numerics"]["torch"] == torch.__version__
    assert base["image_processor"] == "Qwen2VLImageProcessorPil"
    assert describe(model, {"vqa_model": {"batch_size": 64}}) == base
    other_prompt = describe(model, {"vqa_model": {"system_prompt": "Hi"}})
    assert other_prompt["prompt"]["system_prompt"] == "Hi" and other_prompt != base
    assert describe(model, {"vqa_model": {"dtype": "bfloat16"}})["numerics"]["dtype"] == "bfloat16"
    assert describe(model, {"vqa_model": {"attn_implementation": "eager"}}) != base
    cuda = describe(model, device="cuda:1")  # described without the device (a merge may run elsewhere)
    assert cuda["numerics"]["device_type"] == "cuda" and cuda["numerics"]["dtype"] == "bfloat16"
    assert describe(model, device="cuda:0") == cuda


def test_a_model_is_identified_by_its_content_not_its_path_or_file_sizes(demo_dir: Path, tmp_path: Path):
    model = demo_dir / "models" / "qwen2.5-vl-tiny"
    base = describe(model)["model"]
    moved = shutil.copytree(model, tmp_path / "moved")
    assert describe(moved)["model"] == base
    # Retrained: same config, same file names and sizes, other weights.
    weights = moved / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    size = weights.stat().st_size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    assert describe(moved)["model"] != base


def test_vqa_settings_fail_early_like_loading(tmp_path: Path):
    with pytest.raises(InputError, match="model directory not found"):
        describe(tmp_path / "none")
    with pytest.raises(InputError, match="flamingo_3B needs a model directory"):
        describe_settings("flamingo_3B", model_path=None, config={}, device="cpu")
    with pytest.raises(InputError, match="needs a model directory"):
        describe_settings("hf_image_text_to_text", model_path=None, config={}, device="cpu")
