"""Tiny CLIP, Qwen2.5-VL and OpenFlamingo models for the embedded default, in the layouts real models come in.

The real pipeline loads `openai/clip-vit-base-patch32` and `Qwen/Qwen2.5-VL-3B-Instruct` from local
directories with `from_pretrained(..., local_files_only=True)`. The demo builds the same
architectures at toy size (random weights, a tokenizer trained on the demo text, the Qwen2-VL chat
template) and writes them in the same layout, so the very same loading and generation code runs on
them in seconds on a CPU. The tiny OpenFlamingo is written in the layout `--vqa_model flamingo_3B`
reads (`checkpoint.pt` in the official key names, an MPT `lang_encoder/`, a CLIP `vision_encoder/`).
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

# The tiny OpenFlamingo: MPT width 32, 2 layers; CLIP vision width 32 on 32x32 images (16 patches of 8).
TINY_FLAMINGO_MPT = {
    "model_type": "mosaic_gpt",
    "d_model": 32,
    "n_heads": 2,
    "n_layers": 2,
    "mlp_ratio": 4,
    "max_seq_len": 2048,
    "alibi": True,
    "alibi_bias_max": 8,
    "attn_qk_ln": True,
    "no_bias": True,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
}
GPT_NEOX_SPECIAL_TOKENS = ["<|endoftext|>"]

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


def build_tiny_openflamingo(out_dir: Path, corpus: Iterable[str], seed: int = 0) -> Path:
    """Write a tiny OpenFlamingo (random weights) as `checkpoint.pt`, `lang_encoder/`, `vision_encoder/`."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast

    from lever_lm.vqa.flamingo.loading import CHECKPOINT, LANG_DIR, VISION_DIR, load_tokenizer, official_state_dicts
    from lever_lm.vqa.flamingo.model import OpenFlamingo
    from lever_lm.vqa.flamingo.mpt import MPTConfig

    splitter = Tokenizer(models.BPE())
    splitter.normalizer = normalizers.NFC()
    splitter.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = train_bpe(corpus, vocab_size=600, special_tokens=GPT_NEOX_SPECIAL_TOKENS, splitter=splitter)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.normalizer, backend.pre_tokenizer = splitter.normalizer, splitter.pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    eos = GPT_NEOX_SPECIAL_TOKENS[0]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eos, eos_token=eos, unk_token=eos)
    lang_dir, vision_dir = out_dir / LANG_DIR, out_dir / VISION_DIR
    lang_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(lang_dir)
    mpt_settings = {**TINY_FLAMINGO_MPT, "vocab_size": len(vocab) + 8}  # MPT-1B too has more rows than tokens
    (lang_dir / "config.json").write_text(json.dumps(mpt_settings), encoding="utf-8")

    torch.manual_seed(seed)
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    vision = CLIPVisionModel(vision_config).eval()
    full_tokenizer = load_tokenizer(lang_dir)  # with OpenFlamingo's 3 added tokens
    model = OpenFlamingo(
        vision,
        MPTConfig.from_json(lang_dir / "config.json"),
        vocab_rows=len(full_tokenizer),
        media_token_id=full_tokenizer.convert_tokens_to_ids("<image>"),
    )
    with torch.no_grad():  # the original's zero gates and latents would leave the images unused
        model.perceiver.latents.normal_()
        model.lang_model.transformer["ln_f"].weight.normal_()  # else tied embeddings echo the last token
        for block in model.cross_attn:
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    checkpoint, mpt_weights = official_state_dicts(model)
    rows = mpt_settings["vocab_size"] - mpt_weights["transformer.wte.weight"].shape[0]
    mpt_weights["transformer.wte.weight"] = torch.cat([mpt_weights["transformer.wte.weight"], torch.zeros(rows, 32)])
    torch.save({key: value.contiguous() for key, value in checkpoint.items()}, out_dir / CHECKPOINT)
    save_file({key: value.contiguous() for key, value in mpt_weights.items()}, lang_dir / "model.safetensors")
    vision.save_pretrained(vision_dir)
    _normalise_json_files(lang_dir)
    _normalise_json_files(vision_dir)
    return out_dir
