"""The embedded default: a VQA set in the official format and tiny models that load and generate."""

from __future__ import annotations

import filecmp
import json
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, CLIPModel

from lever_lm.demo.build import build_demo
from lever_lm.demo.dataset import Split, most_common
from lever_lm.vqa.backends.processor import load_processor


def _load(split: Split) -> tuple[list[dict], list[dict]]:
    questions = json.loads(split.questions_path.read_text())["questions"]
    annotations = json.loads(split.annotations_path.read_text())["annotations"]
    return questions, annotations


def test_dataset_is_official_vqa_json_with_matching_ids_and_images(demo_dir: Path):
    for name in ("train", "val"):
        split = Split(name, demo_dir / "vqa")
        questions, annotations = _load(split)
        assert len(questions) == len(annotations) > 0
        assert {q["question_id"] for q in questions} == {a["question_id"] for a in annotations}
        assert len({q["question_id"] for q in questions}) == len(questions)
        by_qid = {a["question_id"]: a for a in annotations}
        for q in questions:
            ann = by_qid[q["question_id"]]
            assert ann["image_id"] == q["image_id"]
            assert [a["answer_id"] for a in ann["answers"]] == list(range(1, 11))
            assert ann["answer_type"] in {"other", "number", "yes/no"}
            image_path = split.image_root / f"COCO_{name}2014_{q['image_id']:012d}.jpg"
            assert image_path.is_file()
        with Image.open(split.image_path(questions[0]["image_id"])) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
    train_questions, _ = _load(Split("train", demo_dir / "vqa"))
    assert 200 <= len(train_questions) <= 600


def test_answers_disagree_like_real_annotators(demo_dir: Path):
    _, annotations = _load(Split("train", demo_dir / "vqa"))
    top_share = [Counter(a["answer"] for a in ann["answers"]).most_common(1)[0][1] for ann in annotations]
    assert any(n == 10 for n in top_share)
    assert any(n <= 4 for n in top_share), "some questions should have only ~3 of 10 agreeing"
    raw = [a["answer"] for ann in annotations for a in ann["answers"]]
    assert any(a in {"one", "two", "three", "four"} for a in raw), "number words"
    assert any(a.startswith("a ") for a in raw), "articles"
    assert any(a.endswith(".") for a in raw), "punctuation"
    for ann in annotations:
        assert ann["multiple_choice_answer"] == most_common([a["answer"] for a in ann["answers"]])


def test_most_common_breaks_ties_by_first_occurrence():
    assert most_common(["b", "a", "a", "b", "c"]) == "b"


def test_tiny_clip_reloads_and_embeds(demo_dir: Path):
    model_dir = demo_dir / "models" / "clip-tiny"
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
    processor = load_processor(model_dir)
    image = Image.open(next((demo_dir / "vqa" / "mscoco2014" / "train2014").iterdir()))
    inputs = processor(text=["what color is the circle?"], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_embeds.shape == (1, model.config.projection_dim)
    assert out.text_embeds.shape == (1, model.config.projection_dim)


def test_tiny_qwen_reloads_and_generates_a_batch_of_multi_image_prompts(demo_dir: Path):
    model_dir = demo_dir / "models" / "qwen2.5-vl-tiny"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    processor = load_processor(model_dir)
    processor.tokenizer.padding_side = "left"
    images = sorted((demo_dir / "vqa" / "mscoco2014" / "train2014").iterdir())[:3]
    pics = [Image.open(p).convert("RGB") for p in images]

    def chat(n_images: int) -> str:
        content = []
        for i in range(n_images):
            content += [
                {"type": "image"},
                {"type": "text", "text": f"Question:What color? Short answer:{'red' if i < n_images - 1 else ''}"},
            ]
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    texts = [chat(3), chat(2)]
    inputs = processor(text=texts, images=[pics, pics[:2]], return_tensors="pt", padding=True)
    assert texts[0].count("<|vision_start|>") == 3
    assert inputs["image_grid_thw"].shape == (5, 3)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape == (2, 5)
    assert all(isinstance(s, str) for s in processor.batch_decode(new_tokens, skip_special_tokens=True))


def test_two_builds_with_the_same_seed_are_byte_identical(demo_dir: Path, tmp_path: Path):
    build_demo(tmp_path, seed=0)
    left = sorted(p.relative_to(demo_dir) for p in demo_dir.rglob("*") if p.is_file())
    right = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert left == right
    for rel in left:
        assert filecmp.cmp(demo_dir / rel, tmp_path / rel, shallow=False), rel


def test_another_seed_gives_another_data_set(tmp_path: Path, demo_dir: Path):
    build_demo(tmp_path, seed=1)
    name = "OpenEnded_mscoco_train2014_questions.json"
    assert (tmp_path / "vqa" / name).read_bytes() != (demo_dir / "vqa" / name).read_bytes()


def test_tiny_openflamingo_is_in_the_user_layout_and_answers(demo_dir: Path):
    from lever_lm.vqa.backends import load_backend
    from lever_lm.vqa.prompts import FewShotPrompt, Shot

    model_dir = demo_dir / "models" / "openflamingo-tiny"
    assert (model_dir / "checkpoint.pt").is_file()
    assert (model_dir / "lang_encoder" / "tokenizer.json").is_file() and (model_dir / "vision_encoder").is_dir()
    backend = load_backend("flamingo_3B", model_path=str(model_dir), device="cpu")
    images = sorted((demo_dir / "vqa" / "mscoco2014" / "train2014").iterdir())[:3]
    prompts = [
        FewShotPrompt(shots=(Shot(images[0], "What color?", "red"), Shot(images[1], "What shape?", "circle")),
                      query=Shot(images[2], "What color?")),
        FewShotPrompt(shots=(), query=Shot(images[0], "How many?")),
    ]  # fmt: skip
    results = backend.generate(prompts)
    assert [r.error for r in results] == [None, None] and all(isinstance(r.raw, str) for r in results)
