"""VQA backends on the demo's tiny Qwen2.5-VL: batched == one at a time, caching, failures, load errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lever_lm.demo.dataset import Split
from lever_lm.errors import InputError
from lever_lm.vqa.backends import available_backends, load_backend
from lever_lm.vqa.backends.base import Generation
from lever_lm.vqa.backends.qwen2_5_vl import HF_REPO_ID, resolve_model_path
from lever_lm.vqa.prompts import FewShotPrompt, Shot

# The demo tokenizer knows these words, which gives the random tiny model varied answers.
CONFIG = {
    "vqa_model": {
        "system_prompt": "You are a helpful assistant. Answer the question about the image with a short answer."
    }
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(demo_dir) -> Path:
    return demo_dir / "models" / "qwen2.5-vl-tiny"


@pytest.fixture(scope="module")
def prompts(demo_dir) -> list[FewShotPrompt]:
    """Ten demo prompts with 0 to 3 ICDs; queries repeat, as candidates of one query do."""
    split = Split("train", demo_dir / "vqa")
    questions = json.loads(split.questions_path.read_text(encoding="utf-8"))["questions"]
    answers = {
        a["question_id"]: a["multiple_choice_answer"]
        for a in json.loads(split.annotations_path.read_text(encoding="utf-8"))["annotations"]
    }
    rng = random.Random(0)
    queries = rng.sample(questions, 4)
    out = []
    for k in range(10):
        query = queries[k % 4]
        icds = rng.sample(questions, k % 4)
        shots = tuple(Shot(split.image_path(q["image_id"]), q["question"], answers[q["question_id"]]) for q in icds)
        out.append(FewShotPrompt(shots, Shot(split.image_path(query["image_id"]), query["question"])))
    return out


@pytest.fixture(scope="module")
def qwen(model_dir):
    return load_backend("qwen2.5_vl_3B", model_path=str(model_dir), config=CONFIG, batch_size=16)


@pytest.fixture(scope="module")
def qwen_answers(qwen, prompts) -> list[Generation]:
    return qwen.generate(prompts)


def raws(generations: list[Generation]) -> list[str]:
    return [g.raw for g in generations]


def test_registry_names():
    assert available_backends() == ["qwen2.5_vl_3B", "hf_image_text_to_text", "flamingo_3B"]


def test_qwen_batched_equals_one_at_a_time(qwen, prompts, qwen_answers):
    assert all(g.error is None for g in qwen_answers)
    assert len(set(raws(qwen_answers))) >= 3, "answers must vary, or the comparison proves nothing"
    one_at_a_time = [qwen.generate([prompt])[0] for prompt in prompts]
    assert one_at_a_time == qwen_answers
    assert qwen.generate(prompts[::-1]) == qwen_answers[::-1]  # other neighbours, other padding


def test_qwen_backend_equals_generic_backend_and_processor(model_dir, qwen, prompts, qwen_answers):
    generic = load_backend("hf_image_text_to_text", model_path=str(model_dir), config=CONFIG, batch_size=4)
    assert generic.generate(prompts) == qwen_answers
    # The Qwen backend builds the text side of the batch itself: it must be the processor's.
    batch = [qwen._prepare(prompt) for prompt in prompts[:4]]
    ours = qwen._encode(batch)
    reference = generic.processor(
        text=[p.text for p in batch],
        images=[[img for img in generic._prepare(prompt).images] for prompt in prompts[:4]],
        padding=True,
        return_tensors="pt",
    )
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(ours[key].long(), reference[key].long()), key


@pytest.mark.parametrize(("precompute_vision", "share_prefill"), [(False, False), (True, False), (False, True)])
def test_qwen_shortcuts_change_no_answer(model_dir, prompts, qwen_answers, precompute_vision, share_prefill):
    """Cached vision features and one prefill shared by the beams (both on by default) change nothing."""
    assert qwen_answers
    backend = load_backend("qwen2.5_vl_3B", model_path=str(model_dir), config=CONFIG)
    assert backend.precompute_vision and backend.share_prefill
    backend.precompute_vision, backend.share_prefill = precompute_vision, share_prefill
    backend.image_cache.max_bytes = 0  # nothing kept: every prompt re-reads its images
    assert backend.generate(prompts) == qwen_answers


def test_each_distinct_image_is_prepared_once(model_dir, prompts):
    backend = load_backend("qwen2.5_vl_3B", model_path=str(model_dir), config=CONFIG, batch_size=3)
    backend.generate(prompts)
    backend.generate(prompts)
    distinct = {path for prompt in prompts for path in prompt.images}
    occurrences = sum(len(prompt.images) for prompt in prompts)
    assert backend.image_cache.misses == len(distinct) and len(backend.image_cache) == len(distinct)
    assert backend.image_cache.hits == 2 * occurrences - len(distinct)


def test_an_unreadable_image_fails_only_its_prompt(qwen, prompts, qwen_answers, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (1, 300)).save(sliver)  # the image processor rejects aspect ratios over 200
    bad = [
        FewShotPrompt(prompts[1].shots, Shot(broken, "What?")),
        FewShotPrompt((Shot(tmp_path / "missing.jpg", "Q?", "A"),), prompts[2].query),
        FewShotPrompt((), Shot(sliver, "What?")),
    ]
    out = qwen.generate([prompts[0], bad[0], prompts[3], bad[1], bad[2]])
    assert out[0] == qwen_answers[0] and out[2] == qwen_answers[3]
    assert out[1].raw == out[1].answer == "" and "broken.jpg: cannot read image" in out[1].error
    assert "missing.jpg: image file not found" in out[3].error
    assert out[4].error.startswith("preparing the prompt failed: ValueError")


def test_a_failed_generation_fails_only_its_prompt(qwen, prompts, qwen_answers, monkeypatch):
    real = qwen._generate_texts
    poisoned = qwen._prepare(prompts[2]).text

    def flaky(batch):
        if any(p.text == poisoned for p in batch):
            raise ValueError("a prompt the model rejects (simulated)")
        return real(batch)

    monkeypatch.setattr(qwen, "_generate_texts", flaky)
    out = qwen.generate(prompts[:4])
    assert [out[i] for i in (0, 1, 3)] == [qwen_answers[i] for i in (0, 1, 3)]
    assert out[2].error == "generation failed: ValueError: a prompt the model rejects (simulated)"


def test_config_overrides_reach_the_model_input(model_dir, prompts):
    config = {
        "vqa_model": {"system_prompt": "Be brief.", "query_template": "Q={question} A=", "generation": {"num_beams": 1}}
    }
    backend = load_backend("hf_image_text_to_text", model_path=str(model_dir), config=config)
    text = backend._prepare(prompts[1]).text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"Q={prompts[1].query.question} A=<|im_end|>\n<|im_start|>assistant\n")
    assert backend.generation_kwargs["num_beams"] == 1
    assert backend.settings.prompt.system_prompt == "Be brief."
    assert backend.model.dtype == torch.float32


# -- load errors: all InputErrors, before any work -------------------------------------------------


def test_unknown_and_unsupported_models():
    with pytest.raises(InputError, match="unknown --vqa_model 'llava'"):
        load_backend("llava")
    with pytest.raises(InputError, match="flamingo_3B needs a model directory"):
        load_backend("flamingo_3B")
    with pytest.raises(InputError, match="needs a model directory"):
        load_backend("hf_image_text_to_text")


def test_missing_or_incomplete_model_dirs(tmp_path, model_dir, demo_dir):
    with pytest.raises(InputError, match="model directory not found"):
        load_backend("qwen2.5_vl_3B", model_path=str(tmp_path / "nope"))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(InputError, match="no model weights"):
        load_backend("hf_image_text_to_text", model_path=str(no_weights))
    with pytest.raises(InputError, match="expects a Qwen2.5-VL model, found model_type 'clip'"):
        load_backend("qwen2.5_vl_3B", model_path=str(demo_dir / "models" / "clip-tiny"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(model_dir):
    with pytest.raises(InputError, match="CUDA is not available"):
        load_backend("qwen2.5_vl_3B", model_path=str(model_dir), device="cuda:0")


def test_model_path_from_the_local_hf_cache(tmp_path, model_dir):
    with pytest.raises(InputError, match="is not in"):
        resolve_model_path(None, cache_dir=tmp_path)
    # The layout huggingface_hub writes: refs/main names the snapshot holding the files.
    repo = tmp_path / ("models--" + HF_REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert resolve_model_path(None, cache_dir=tmp_path) == snapshot
    assert resolve_model_path("/explicit", cache_dir=tmp_path) == Path("/explicit")


def test_processor_kwargs_reach_the_image_processor(model_dir, prompts):
    """E.g. Qwen's min/max pixels: 112x112 px is 8x8 patches of 14 px, merged 2x2 into 16 image tokens."""
    config = {"vqa_model": {"processor_kwargs": {"size": {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}}}}
    qwen = load_backend("qwen2.5_vl_3B", model_path=str(model_dir), config=config)
    assert qwen.image_cache.get(prompts[0].query.image).num_tokens == 16
    generic = load_backend("hf_image_text_to_text", model_path=str(model_dir), config=config)
    inputs = generic._encode([generic._prepare(prompts[0])])
    assert int((inputs["input_ids"] == qwen.image_token_id).sum()) == 16 * len(prompts[0].images)
    assert torch.equal(inputs["input_ids"].cpu(), qwen._encode([qwen._prepare(prompts[0])])["input_ids"].cpu())
