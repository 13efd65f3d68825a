"""Tiny CLIP and Qwen2.5-VL models for the embedded default, saved as standard Hugging Face dirs.

The real pipeline loads `openai/clip-vit-base-patch32` and `Qwen/Qwen2.5-VL-3B-Instruct` from local
directories with `from_pretrained(..., local_files_only=True)`. The demo builds the same
architectures at toy size (random weights, a tokenizer trained on the demo text, the Qwen2-VL chat
template) and writes them in the same layout, so the very same loading and generation code runs on
them in seconds on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from lever_lm.demo.tokenizer import train_bpe

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]

# The chat template of the Qwen2-VL / Qwen2.5-VL instruct models.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Each image becomes a 56x56 input: 4x4 patches of 14 pixels, merged 2x2 into 4 LLM tokens.
TINY_QWEN_IMAGE_PIXELS = 56 * 56
TINY_CLIP_IMAGE_SIZE = 32


def build_qwen_tokenizer(corpus: Iterable[str], vocab_size: int = 600, fill_to: int | None = None) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer (Qwen's pre-tokenizer and special tokens) with a BPE vocabulary trained on `corpus`.

    `fill_to` appends placeholder words (" w<id>", never produced by encoding: no merge leads to
    them) up to that many ids, so that every id a model with that vocabulary emits decodes to text.
    """
    splitter = Qwen2Tokenizer().backend_tokenizer
    vocab, merges = train_bpe(corpus, vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, splitter=splitter)
    for i in range(len(vocab), fill_to or 0):
        vocab[f"\u0120w{i}"] = i  # "\u0120" is byte-level BPE's space
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    return tokenizer


def build_tiny_qwen2_5_vl(out_dir: Path, corpus: Iterable[str], seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL (random weights) with tokenizer, image processor and chat template."""
    tokenizer = build_qwen_tokenizer(corpus)
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
            bos_token_id=None,
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=112,
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TINY_QWEN_IMAGE_PIXELS, max_pixels=TINY_QWEN_IMAGE_PIXELS)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE, encoding="utf-8")
    _normalise_json_files(out_dir)
    return out_dir


def build_tiny_clip(out_dir: Path, corpus: Iterable[str], seed: int = 0) -> Path:
    """Write a tiny CLIP (random weights) with a CLIP tokenizer and image processor."""
    splitter = CLIPTokenizer().backend_tokenizer
    lowered = [text.lower() for text in corpus]  # CLIP's tokenizer lower-cases its input
    vocab, merges = train_bpe(
        lowered, vocab_size=800, special_tokens=CLIP_SPECIAL_TOKENS, splitter=splitter, end_of_word_suffix="</w>"
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=TINY_CLIP_IMAGE_SIZE,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    _normalise_json_files(out_dir)
    return out_dir


def _normalise_json_files(out_dir: Path) -> None:
    """Rewrite the saved JSON files with sorted keys, so builds are byte-identical."""
    for path in sorted(out_dir.glob("*.json")):
        obj = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
