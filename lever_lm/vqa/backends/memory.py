"""Batch size and image-cache budget from the GPU's free memory, when the config leaves them open.

A fixed default wastes a large card or overflows a small one. Qwen2.5-VL-3B in bf16 holds 7.5 GB
of weights; each two-shot prompt of ~1.4k tokens then needs, with 3 beams, ~0.14 GB of KV cache and
~0.12 GB of prefill transients, and each cached image's vision features 1.5 MB. So, after the model
is on the device:

- the image cache gets IMAGE_CACHE_SHARE of the free memory (an 80 GB card then holds all of
  OK-VQA's ~9k training images; 1 GiB held only ~670);
- the batch size is the largest power of two whose estimated peak fits in BATCH_SHARE of the free
  memory, at most MAX_AUTO_BATCH (more gains little: the GPU is busy from ~32 prompts on).

Off CUDA the defaults of `model_config` apply. An estimate that proves too large is caught at run
time: an out-of-memory halves the batch (`base.BatchRunner`) and shrinks the image cache.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from lever_lm.vqa.model_config import DEFAULT_BATCH_SIZE, DEFAULT_IMAGE_CACHE_MB, VQAModelSettings

log = logging.getLogger(__name__)

IMAGE_CACHE_SHARE = 0.35
BATCH_SHARE = 0.45
MAX_AUTO_BATCH = 64
PROMPT_TOKENS = 1_400  # a two-shot prompt: 3 images of ~391 tokens (640x480) and ~150 text tokens


def resolve_memory_settings(settings: VQAModelSettings, model, device: torch.device) -> VQAModelSettings:
    """`settings` with `batch_size` and `image_cache_mb` decided (the config's values when given)."""
    free = free_device_memory(device)
    batch_size = settings.batch_size
    cache_mb = settings.image_cache_mb
    if batch_size is None:
        beams = settings.generation.get("num_beams", 1)
        batch_size = DEFAULT_BATCH_SIZE if free is None else auto_batch_size(free, model, beams=beams)
    if cache_mb is None:
        cache_mb = DEFAULT_IMAGE_CACHE_MB if free is None else int(free * IMAGE_CACHE_SHARE) // 2**20
    if free is not None and (settings.batch_size is None or settings.image_cache_mb is None):
        log.info(
            "%s: %.1f GiB free after loading the model; batch size %d, image cache %d MB%s",
            device,
            free / 2**30,
            batch_size,
            cache_mb,
            " (from the free memory)" if settings.batch_size is None and settings.image_cache_mb is None else "",
        )
    return dataclasses.replace(settings, batch_size=batch_size, image_cache_mb=cache_mb)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (None elsewhere: the host's memory is the OS's business)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def auto_batch_size(free_bytes: int, model, beams: int = 3, prompt_tokens: int = PROMPT_TOKENS) -> int:
    """The largest power of two (1..MAX_AUTO_BATCH) whose estimated memory fits BATCH_SHARE of `free_bytes`."""
    per_prompt = prompt_bytes(model, beams, prompt_tokens)
    fits = int(free_bytes * BATCH_SHARE // per_prompt)
    size = 1
    while size * 2 <= min(fits, MAX_AUTO_BATCH):
        size *= 2
    return size


def prompt_bytes(model, beams: int, prompt_tokens: int) -> int:
    """Estimated peak bytes per prompt: the KV cache of every beam plus the prefill's MLP transients
    (about three [tokens, intermediate] tensors alive at once)."""
    text = model.config.get_text_config()
    element = torch.finfo(model.dtype).bits // 8
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * element
    transients_per_token = 3 * text.intermediate_size * element
    return prompt_tokens * (beams * kv_per_token + transients_per_token)
