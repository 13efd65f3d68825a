"""Qwen2.5-VL backend (`--vqa_model qwen2.5_vl_3B`): the generic chat backend with per-image work done once.

The model is `Qwen/Qwen2.5-VL-3B-Instruct` (any Qwen2.5-VL checkpoint works), from, in order:
`model_path` (the --vqa_model_path flag), `vqa_model.path` in --config, or the local Hugging Face
cache (`huggingface_hub`, offline: never downloads).

What makes it fast: the RL generator scores ~10 candidates per query, every one showing the query
image, and candidates share ICDs. Per distinct image this backend once
1. reads and decodes the file,
2. runs the image processor (resize to a multiple of 28 px, normalise, cut into 14 px patches), and
3. runs the vision tower, keeping its output features (on the model's device),
all kept in an LRU cache bounded by `vqa_model.image_cache_mb`. After the generator proposes a
block, `prefetch` does steps 1-2 for the block's new images in threads while step 3 runs image by
image (base class). A batch then needs only text
work: the chat texts with each `<|image_pad|>` expanded to the image's token count (exactly what
`Qwen2_5_VLProcessor` does), left-padded, plus each image's grid (for the 3D rotary positions)
and its cached features, handed to `generate` as precomputed `mm_encoder_outputs`. Left padding is
safe: the 3D rotary positions are computed from the attention mask, so a padded row gets the same
positions, and on CPU in float32 the same answer, as the prompt alone (on a GPU in bf16, rounding
depends on the batch shape, so rare near-ties can flip).

With a transformers version whose Qwen2.5-VL `forward` has no `mm_encoder_outputs`, step 3 is
skipped and the cached processed pixels are passed instead (the vision tower then runs per batch).

And the prompt is read once, not once per beam: `generate` with 3 beams copies every prompt 3
times before its first forward pass, and that prefill of ~1,000-token prompts is nearly all the
cost of a 5-token answer. So the backend runs the forward pass over each prompt but its last token
itself, copies the resulting KV cache 3 times, and lets `generate` (the same beam search) go on
from there: one third of the prefill work, the same answers on CPU in float32 (the tests compare
both ways; on a GPU in bf16 the last prompt token runs as a cached one-token step, another kernel,
so rare near-ties can flip: the GPU check measures the agreement). Reply likelihoods
(`generate(prompts, replies)`) continue from the prompts' part of that same cache, so they cost
only the replies' own tokens (see `image_text_to_text`).

Scoring replies without generating (`score_replies`, InfoScore) prefills the prompts itself, and
runs the prefix every prompt of the batch shares -- the system turn and, for one beam's
expansions, the ICDs the beam holds, images included -- once (`shared_prefix`): with 2 shots, at
the second step, the system turn and the first of the prompt's three images and texts.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lever_lm.errors import InputError
from lever_lm.vqa.backends.base import resolve_device
from lever_lm.vqa.backends.image_text_to_text import (
    ImageTextToTextBackend,
    PreparedPrompt,
    check_model_dir,
    describe_chat_model,
    load_model_and_processor,
    model_type,
)
from lever_lm.vqa.backends.processor import IMAGE_PROCESSOR
from lever_lm.vqa.backends.reply_likelihood import TEXT_KEYS
from lever_lm.vqa.backends.shared_prefix import images_in_prefix, prefix_first, shared_prefix_length
from lever_lm.vqa.model_config import resolve_settings

NAME = "qwen2.5_vl_3B"
MIN_SHARED_PREFIX = 2  # tokens; below this the extra forward call costs more than it saves
HF_REPO_ID = "Qwen/Qwen2.5-VL-3B-Instruct"
MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class QwenImage:
    """One image, processed once: its patch grid and either its vision features or its pixels."""

    grid_thw: torch.Tensor  # [1, 3] long: temporal, height, width patches
    num_tokens: int  # <|image_pad|> tokens it takes in the text (patches / merge_size**2)
    features: torch.Tensor | None = None  # [num_tokens, hidden] vision tower output, on the model's device
    pixel_values: torch.Tensor | None = None  # [patches, C*T*P*P] when features cannot be precomputed


class Qwen2_5_VLBackend(ImageTextToTextBackend):
    """See the module doc."""

    def __init__(
        self,
        *args,
        precompute_vision: bool | None = None,
        share_prefill: bool = True,
        share_prefix: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        forward_parameters = inspect.signature(self.model.forward).parameters
        if precompute_vision is None:
            precompute_vision = "mm_encoder_outputs" in forward_parameters
        self.precompute_vision = precompute_vision
        self.share_prefill = share_prefill
        self.share_prefix = share_prefix  # teacher-forced scoring runs a batch's common prefix once
        self.image_token = self.processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_size = self.processor.image_processor.merge_size

    def _process_image(self, image) -> QwenImage:
        """Host side (thread-safe): resize, normalise, cut into patches; pixels in the model's dtype
        (the tower casts them to it anyway) and, for a GPU, in pinned memory, so that the copy to the
        device is half the size and overlaps the work."""
        processed = self.processor.image_processor(
            images=[image], return_tensors="pt", **self.settings.processor_kwargs
        )
        grid_thw = processed["image_grid_thw"]
        num_tokens = int(grid_thw.prod()) // self.merge_size**2
        pixel_values = processed["pixel_values"]
        if self.precompute_vision:
            pixel_values = pixel_values.to(self.model.dtype)
            if self.device.type == "cuda":
                pixel_values = pixel_values.pin_memory()
        return QwenImage(grid_thw=grid_thw, num_tokens=num_tokens, pixel_values=pixel_values)

    def _image_entry(self, processed: QwenImage) -> QwenImage:
        """The vision tower on this one image: its features replace its pixels (batch 1, so that an
        image's features never depend on which other images were prepared with it)."""
        if not self.precompute_vision:
            return processed
        pixel_values = processed.pixel_values.to(self.device, non_blocking=True)
        with torch.inference_mode():
            output = self.model.get_image_features(pixel_values, processed.grid_thw.to(self.device), return_dict=True)
        features = output.pooler_output[0]
        return QwenImage(grid_thw=processed.grid_thw, num_tokens=processed.num_tokens, features=features)

    def _encode(self, batch: list[PreparedPrompt]) -> dict:
        images: list[QwenImage] = [image for prepared in batch for image in prepared.images]
        texts = [self._expand_image_tokens(prepared) for prepared in batch]
        tokens = self.chat.tokenize(texts, padding=True, return_tensors="pt")
        input_ids = tokens["input_ids"]
        inputs = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": tokens["attention_mask"].to(self.device),
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32).to(self.device),
            "image_grid_thw": torch.cat([image.grid_thw for image in images]).to(self.device),
        }
        if self.precompute_vision:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            features = tuple(image.features for image in images)
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        else:
            pixels = torch.cat([image.pixel_values for image in images])
            inputs["pixel_values"] = pixels.to(device=self.device, dtype=self.model.dtype)
        return inputs

    def _scoring_prefill(self, inputs: dict, batch: list[PreparedPrompt]) -> tuple[Any, dict]:
        """The prefill for teacher-forced scoring, the batch's common prefix run once (`shared_prefix`).

        The prefix (one row, with its images' features) and then every row's rest (from a copy of
        the prefix's cache, with the rest's images) run at the 3D positions the model computes for
        the whole rows; the position offsets the model keeps for the steps that follow
        (`rope_deltas`) are set from those rows, as its own prefill sets them. Without cached
        vision features, or with nothing shared, it is the plain prefill.
        """
        length = 0
        if self.share_prefix and self.precompute_vision and len(batch) > 1:
            text = {key: inputs[key][:, :-1] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
            images = [prepared.image_paths for prepared in batch]
            length = shared_prefix_length(text["input_ids"], text["attention_mask"], text["mm_token_type_ids"], images)
        if length < MIN_SHARED_PREFIX:
            return self._prefill(inputs), inputs
        inputs = prefix_first(inputs, TEXT_KEYS, length)
        return self._prefix_prefill(inputs, [len(prepared.images) for prepared in batch], length), inputs

    def _prefix_prefill(self, inputs: dict, image_counts: list[int], length: int):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        core = self.model.model
        ids, mask, types = (inputs[key][:, :-1] for key in ("input_ids", "attention_mask", "mm_token_type_ids"))
        positions, deltas = core.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask
        )
        features = inputs["mm_encoder_outputs"]["image"].pooler_output  # every row's images, row by row
        shared = images_in_prefix(types[0], length)
        starts = [sum(image_counts[:b]) for b in range(len(image_counts))]
        rest = [features[start + i] for start, count in zip(starts, image_counts) for i in range(shared, count)]

        def run(rows: slice, columns: slice, images: list, cache=None):
            encoded = {"image": BaseModelOutputWithPooling(pooler_output=tuple(images))} if images else None
            output = self.model(
                input_ids=ids[rows, columns],
                attention_mask=mask[rows, : columns.stop],
                position_ids=positions[:, rows, columns],
                mm_encoder_outputs=encoded,
                use_cache=True,
                **({self._cache_argument: cache} if cache is not None else {}),
                **self._prefill_kwargs,
            )
            return getattr(output, self._cache_argument)

        cache = run(slice(0, 1), slice(0, length), list(features[:shared]))
        cache.batch_repeat_interleave(len(image_counts))
        cache = run(slice(None), slice(length, ids.shape[1]), rest, cache)
        core.rope_deltas = deltas  # what the model's own prefill leaves for the tokens that follow
        return cache

    def _expand_image_tokens(self, prepared: PreparedPrompt) -> str:
        """Each `<|image_pad|>` of the chat text repeated as many times as its image has tokens (the
        text's only image tokens are the template's: one in a user string is escaped)."""
        pieces = re.split(re.escape(self.image_token), prepared.text)
        if len(pieces) != len(prepared.images) + 1:
            raise ValueError(f"the chat text has {len(pieces) - 1} image tokens for {len(prepared.images)} images")
        out = [pieces[0]]
        for image, piece in zip(prepared.images, pieces[1:]):
            out.append(self.image_token * image.num_tokens)
            out.append(piece)
        return "".join(out)


def resolve_model_path(settings_path: str | None, cache_dir: str | Path | None = None) -> Path:
    """The configured directory, else the local Hugging Face cache's snapshot of HF_REPO_ID (offline)."""
    if settings_path is not None:
        return Path(settings_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(HF_REPO_ID, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        where = cache_dir or "the Hugging Face cache (HF_HOME / HF_HUB_CACHE)"
        raise InputError(
            None,
            f"{HF_REPO_ID} is not in {where}; download it there, or give its directory "
            "with --vqa_model_path or vqa_model.path in --config",
        ) from None


def describe_settings(name: str, *, model_path: str | None, config: dict | None, device: str) -> dict:
    """What shapes this backend's answers, without loading the model (see `describe_chat_model`)."""
    settings = resolve_settings("chat", config, model_path=model_path)
    path = check_model_dir(resolve_model_path(settings.path))
    return describe_chat_model(name, path, settings, device, image_processor=IMAGE_PROCESSOR)


def load(
    name: str = NAME,
    *,
    model_path: str | None = None,
    device: str = "cpu",
    config: dict | None = None,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> Qwen2_5_VLBackend:
    """The Qwen2.5-VL backend; InputError before any work when the model cannot be loaded."""
    settings = resolve_settings("chat", config, model_path=model_path, batch_size=batch_size)
    torch_device = resolve_device(device)
    path = check_model_dir(resolve_model_path(settings.path, cache_dir))
    found = model_type(path)
    if found not in MODEL_TYPES:
        raise InputError(
            path,
            f"--vqa_model {name} expects a Qwen2.5-VL model, found model_type {found!r}; "
            "use --vqa_model hf_image_text_to_text for other chat VLMs",
        )
    model, processor = load_model_and_processor(path, torch_device, settings)
    return Qwen2_5_VLBackend(name, model, processor, settings, torch_device, path)
