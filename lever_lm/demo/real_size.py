"""Qwen2.5-VL-3B at its real size with random weights, and COCO-size synthetic photos.

For the real-size benchmark, the size tests and the GPU check: the cost per token and every size
that the image path depends on are the real model's, and nothing needs downloading.

The architecture is the published one, written out below from `Qwen/Qwen2.5-VL-3B-Instruct`'s
`config.json` (text: 36 layers of width 2048, MLP 11,008, 16 query / 2 KV heads, vocabulary
151,936, tied embeddings; vision: 32 blocks of width 1280, windows of 112 px, full attention in
blocks 7, 15, 23 and 31, output width 2048) and `preprocessor_config.json` (14 px patches merged
2x2, `min_pixels` 3,136 and `max_pixels` 12,845,056, CLIP's mean and std). A 640x480 photo then
becomes 34x46 patches and 391 tokens, as with the real model. What differs:
- random weights (seeded): the same cost, meaningless answers;
- the tokenizer: Qwen's pre-tokenizer and special tokens, with a BPE vocabulary trained on the
  prompts' own text (`build_qwen_tokenizer`), so each common word is one token, about as with
  Qwen's own 151k vocabulary; the special tokens have other ids than in the published config, and
  the rest of the 151,936 ids decode to placeholder words (so random answers are distinct texts).

`layers` / `vision_layers` keep the full width at a lower depth (a CPU cannot hold 3.75B float32
parameters beside anything else); `narrow=True` shrinks the widths instead and keeps every size
that the image path depends on (patch, merge and window sizes, the processor's pixel limits), for
tests that catch size-dependent bugs in seconds.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from lever_lm.demo.tiny_models import QWEN2_VL_CHAT_TEMPLATE, build_qwen_tokenizer
from lever_lm.vqa.backends.processor import ImageOnlyQwen2_5_VLProcessor
from lever_lm.vqa.model_config import DEFAULT_SYSTEM_PROMPT

# Qwen/Qwen2.5-VL-3B-Instruct, config.json (the values the model uses; token ids come from our tokenizer).
QWEN2_5_VL_3B_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
    "sliding_window": 32768,
    "max_window_layers": 70,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}
QWEN2_5_VL_3B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "hidden_act": "silu",
    "in_channels": 3,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
QWEN2_5_VL_3B_TIE_WORD_EMBEDDINGS = True
QWEN2_5_VL_3B_TOKEN_IDS = {
    "<|endoftext|>": 151643,  # bos, and the tokenizer's pad
    "<|im_end|>": 151645,  # eos
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
# Qwen/Qwen2.5-VL-3B-Instruct, preprocessor_config.json.
QWEN2_5_VL_3B_IMAGE_PROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
# Narrow widths for tests; every size of the image path stays real.
NARROW_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
}
NARROW_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}

PHOTO_SIZE = (640, 480)  # a typical COCO photo
TOKENIZER_VOCAB = 2000

# OK-VQA-like questions (outside knowledge about everyday scenes) and short answers.
QUESTION_TEMPLATES = [
    "What is the {thing} in this picture used for?",
    "What brand is the {thing} on the {place}?",
    "Which country is famous for this kind of {thing}?",
    "What material is the {thing} made of?",
    "What season of the year is it in this {place}?",
    "Why is the {thing} next to the {place}?",
    "How old does the {thing} look?",
    "What sport can you play with this {thing}?",
    "Who invented the {thing} shown here?",
    "What is the name of the {place} in the background?",
]
THINGS = ["bus", "dog", "pizza", "umbrella", "clock", "kite", "surfboard", "train", "laptop", "horse", "vase", "bench"]
PLACES = ["street", "table", "beach", "kitchen", "park", "station", "field", "room"]
ANSWERS = ["yes", "no", "two", "red", "wood", "summer", "travel", "tennis", "italy", "edison", "metal", "fun"]


def qwen2_5_vl_3b_config(
    token_ids: dict[str, int] = QWEN2_5_VL_3B_TOKEN_IDS,
    *,
    layers: int | None = None,
    vision_layers: int | None = None,
    narrow: bool = False,
) -> Qwen2_5_VLConfig:
    """The published 3B config at full width, with the special tokens at `token_ids` (a tokenizer's);
    `layers` / `vision_layers` cut the depth (the vision tower keeps the full-attention blocks that
    fall within it), `narrow` the widths."""
    text = {**QWEN2_5_VL_3B_TEXT, **(NARROW_TEXT if narrow else {})}
    vision = {**QWEN2_5_VL_3B_VISION, **(NARROW_VISION if narrow else {})}
    if layers is not None:
        text["num_hidden_layers"] = layers
    if vision_layers is not None:
        vision["depth"] = vision_layers
    vision["fullatt_block_indexes"] = [i for i in QWEN2_5_VL_3B_VISION["fullatt_block_indexes"] if i < vision["depth"]]
    if narrow and not vision["fullatt_block_indexes"]:
        vision["fullatt_block_indexes"] = [vision["depth"] - 1]  # one full-attention block, as every group has
    text.update(
        bos_token_id=None, eos_token_id=token_ids["<|im_end|>"], pad_token_id=token_ids["<|endoftext|>"]
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=QWEN2_5_VL_3B_TIE_WORD_EMBEDDINGS,
    )


def build_processor(corpus: Iterable[str] = ()) -> ImageOnlyQwen2_5_VLProcessor:
    """The 3B model's image processor and chat template, with a tokenizer trained on the prompt text."""
    texts = [DEFAULT_SYSTEM_PROMPT, "Question: Short answer:", *prompt_corpus(), *corpus]
    tokenizer = build_qwen_tokenizer(texts, vocab_size=TOKENIZER_VOCAB, fill_to=QWEN2_5_VL_3B_TEXT["vocab_size"])
    image_processor = Qwen2VLImageProcessorPil(**QWEN2_5_VL_3B_IMAGE_PROCESSOR)
    return ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )


def token_ids(processor) -> dict[str, int]:
    """The special tokens' ids in `processor`'s tokenizer, for `qwen2_5_vl_3b_config`."""
    return {token: processor.tokenizer.convert_tokens_to_ids(token) for token in QWEN2_5_VL_3B_TOKEN_IDS}


def build_random_model(config: Qwen2_5_VLConfig, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """The model with seeded random weights, created directly on `device` in `dtype` (no host copy)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model.eval()


def save_model_dir(out_dir: Path, model, processor) -> Path:
    """A Hugging Face model directory the backends load like the real one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE, encoding="utf-8")
    return out_dir


def prompt_corpus() -> list[str]:
    """Every question and answer `synthetic_question` can produce, for the tokenizer."""
    questions = [t.format(thing=thing, place=place) for t in QUESTION_TEMPLATES for thing in THINGS for place in PLACES]
    return questions + ANSWERS


def synthetic_question(rng: random.Random) -> tuple[str, str]:
    template = rng.choice(QUESTION_TEMPLATES)
    return template.format(thing=rng.choice(THINGS), place=rng.choice(PLACES)), rng.choice(ANSWERS)


def synthetic_photo(seed: int, size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A photo-like picture: smooth colour fields plus grain, so that JPEG sizes and decoding cost
    are like a real photo's (a flat image would decode much faster)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0.0, 12.0, size=smooth.shape)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def write_photos(directory: Path, count: int, seed: int = 0, size: tuple[int, int] = PHOTO_SIZE) -> list[Path]:
    """`count` distinct synthetic JPEG photos (quality 90, as COCO's are about)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"photo_{i:05d}.jpg"
        if not path.exists():
            synthetic_photo(seed * 1_000_003 + i, size).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (the cache keys images by path, so a linked
    file costs as much per use as a distinct one), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())


def random_weight_backend(model, processor, device: torch.device | str, config: dict | None = None, batch_size=None):
    """The generator's real Qwen2.5-VL backend around an in-memory model (nothing saved to disk)."""
    from lever_lm.vqa.backends.qwen2_5_vl import NAME, Qwen2_5_VLBackend
    from lever_lm.vqa.model_config import resolve_settings

    settings = resolve_settings("chat", config, batch_size=batch_size)
    return Qwen2_5_VLBackend(NAME, model, processor, settings, torch.device(device), Path("(random weights)"))


def write_okvqa_size_dataset(root: Path, items: int = 9009, distinct_photos: int = 512, seed: int = 0) -> dict:
    """An OK-VQA-size training split under `root` (the demo's file layout): `items` questions, one
    640x480 photo file each (hard links to `distinct_photos` different photos), 10 answers each."""
    from lever_lm.demo.dataset import Split

    split = Split("train", root)
    photos = write_photos(root / "photos", distinct_photos, seed=seed)
    split.image_root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions, annotations = [], []
    for row in range(items):
        image_id, question_id = 100_000 + row, (100_000 + row) * 10
        target = split.image_path(image_id)
        if not target.exists():
            link_or_copy(photos[row % distinct_photos], target)
        question, answer = synthetic_question(rng)
        answers = [answer if rng.random() < 0.7 else rng.choice(ANSWERS) for _ in range(10)]
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        annotations.append({
            "question_id": question_id, "image_id": image_id, "question_type": question.split()[0].lower(),
            "answer_type": "other", "multiple_choice_answer": max(set(answers), key=answers.count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
        })  # fmt: skip
    header = {"info": {"description": "synthetic OK-VQA-size set"}, "data_subtype": "train2014"}
    split.questions_path.write_text(json.dumps({**header, "questions": questions}), encoding="utf-8")
    split.annotations_path.write_text(json.dumps({**header, "annotations": annotations}), encoding="utf-8")
    return {"questions": split.questions_path, "annotations": split.annotations_path, "images": split.image_root}


# VQAv2's training split: questions and COCO train2014 images.
VQAV2_TRAIN_QUESTIONS = 443_757
VQAV2_TRAIN_IMAGES = 82_783
VQAV2_ANSWER_TYPES = ("yes/no", "number", "other")


def write_vqav2_size_dataset(
    root: Path, questions: int = VQAV2_TRAIN_QUESTIONS, images: int = VQAV2_TRAIN_IMAGES, seed: int = 0
) -> dict:
    """A VQAv2-size training split under `root` (the demo's file layout), for start-up benchmarks:
    `questions` questions over `images` image files, 10 answers each, every field of the official
    files (answer confidences and ids, question and answer types). The image files are tiny but
    distinct: one of 16 small JPEG photos, each followed by its own id (decoders stop at the
    photo's end), so every file has its own content digest as COCO's photos do."""
    from lever_lm.demo.dataset import Split

    if not 1 <= images <= questions:
        raise ValueError(f"need 1 <= images <= questions, got {images} images for {questions} questions")
    split = Split("train", root)
    split.image_root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    photos = [_jpeg_bytes(synthetic_photo(seed * 1_000_003 + i, (32, 24))) for i in range(16)]
    image_ids = rng.sample(range(1, 600_000), images)  # COCO ids, in no particular order
    for k, image_id in enumerate(image_ids):
        target = split.image_path(image_id)
        if not target.exists():
            target.write_bytes(photos[k % len(photos)] + f"synthetic image {image_id}".encode())
    per_image = [questions // images + (k < questions % images) for k in range(images)]
    records, annotations = [], []
    for image_id, count in zip(image_ids, per_image):
        for j in range(count):
            question_id = image_id * 1000 + j  # VQAv2's numbering
            question, answer = synthetic_question(rng)
            answers = [answer if rng.random() < 0.7 else rng.choice(ANSWERS) for _ in range(10)]
            records.append({"image_id": image_id, "question": question, "question_id": question_id})
            annotations.append({
                "question_type": " ".join(question.split()[:2]).lower(), "multiple_choice_answer": answer,
                "answers": [{"answer": a, "answer_confidence": rng.choice(("yes", "maybe", "no")), "answer_id": i + 1}
                            for i, a in enumerate(answers)],
                "image_id": image_id, "answer_type": rng.choice(VQAV2_ANSWER_TYPES), "question_id": question_id,
            })  # fmt: skip
    header = {"info": {"description": "synthetic VQAv2-size set"}, "license": {}, "data_subtype": "train2014"}
    questions_file = {**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": records}
    split.questions_path.write_text(json.dumps(questions_file), encoding="utf-8")
    split.annotations_path.write_text(json.dumps({**header, "annotations": annotations}), encoding="utf-8")
    return {"questions": split.questions_path, "annotations": split.annotations_path, "images": split.image_root}


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
