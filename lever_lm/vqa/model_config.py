"""VQA model settings: each model family's defaults, overridden by the `vqa_model:` section of `--config`.

So that a user can reproduce the exact prompt and decoding of their own evaluation, everything
that shapes an answer is a setting. The `vqa_model:` section of the `--config` YAML (every key
optional; unknown keys are an error, to catch typos):

    vqa_model:
      path: /models/Qwen2.5-VL-3B-Instruct   # model directory (the --vqa_model_path flag wins)
      system_prompt: "You are ..."           # chat models; null = no system turn (the chat template's own default)
      icd_template: "Question:{question} Short answer:{answer}"
      query_template: "Question:{question} Short answer:"
      generation:                            # keyword arguments of `model.generate` (any GenerationConfig field)
        max_new_tokens: 5
        num_beams: 3
        length_penalty: 0.0
        do_sample: false
      batch_size: null                       # prompts per generate call (the generator's --batch_size flag wins);
                                             #   null = from the GPU's free memory (16 to 64), 16 off CUDA
      image_cache_mb: null                   # per-image cache budget: Qwen2.5-VL keeps vision features on the
                                             #   model's device (~1.6 MB per COCO image for the 3B model); the
                                             #   generic backend keeps decoded images (0 = keep nothing);
                                             #   null = 35% of the GPU's free memory, 1024 off CUDA
      prefetch_threads: 4                    # threads that read and process a block's images ahead of use
      processor_kwargs: {}                   # extra image-processor arguments, e.g. for Qwen2.5-VL
                                             #   {size: {shortest_edge: 3136, longest_edge: 1003520}} (min/max pixels)
      dtype: null                            # null = bfloat16 on a CUDA device with native bf16, float16 on an
                                             #   older one, float32 on CPU; or "float32", ...
      attn_implementation: null              # null = transformers' default (sdpa); or "flash_attention_2", ...
      vision_attn_implementation: null       # the vision tower's alone, e.g. "flash_attention_2" (one call per
                                             #   layer instead of one per window); null = as attn_implementation

Precedence: explicit arguments (command-line flags) > the config section > the family defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lever_lm.config import config_section
from lever_lm.errors import InputError
from lever_lm.io import is_json_number
from lever_lm.vqa.prompts import PromptTemplate

SECTION = "vqa_model"

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant for visual question answering. The user shows example images, each "
    "followed by a question about it and its short answer, and then a new image with a question. "
    "Answer the question about the last image in the style of the examples: a single word or a short phrase."
)
CHAT_TEMPLATE = PromptTemplate(
    system_prompt=DEFAULT_SYSTEM_PROMPT,
    icd_template="Question:{question} Short answer:{answer}",
    query_template="Question:{question} Short answer:",
)
FLAMINGO_TEMPLATE = PromptTemplate(
    system_prompt=None,
    icd_template="Question:{question} Short answer:{answer}<|endofchunk|>",
    query_template="Question:{question} Short answer:",
)
# docs/formats.md §5: 3 beams, 5 new tokens, no length penalty, no sampling.
DEFAULT_GENERATION = {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0, "do_sample": False}
DEFAULT_BATCH_SIZE = 16
DEFAULT_IMAGE_CACHE_MB = 1024
DEFAULT_PREFETCH_THREADS = 4


@dataclass(frozen=True)
class VQAModelSettings:
    """Everything a backend needs besides the device; see the module doc for each field."""

    prompt: PromptTemplate
    generation: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_GENERATION))
    path: str | None = None
    batch_size: int | None = None  # None: decided by the backend (`backends.memory`)
    image_cache_mb: int | None = None  # likewise
    prefetch_threads: int = DEFAULT_PREFETCH_THREADS
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    attn_implementation: str | None = None
    vision_attn_implementation: str | None = None


FAMILY_DEFAULTS = {
    "chat": VQAModelSettings(prompt=CHAT_TEMPLATE),
    "flamingo": VQAModelSettings(prompt=FLAMINGO_TEMPLATE),
}
KEYS = (
    "path",
    "system_prompt",
    "icd_template",
    "query_template",
    "generation",
    "batch_size",
    "image_cache_mb",
    "prefetch_threads",
    "processor_kwargs",
    "dtype",
    "attn_implementation",
    "vision_attn_implementation",
)


def resolve_settings(
    family: str, config: dict | None = None, *, model_path: str | None = None, batch_size: int | None = None
) -> VQAModelSettings:
    """The family's defaults, overridden by `config["vqa_model"]`, then by the explicit arguments."""
    settings = FAMILY_DEFAULTS[family]
    section = _section(config)
    unknown = sorted(set(section) - set(KEYS))
    if unknown:
        raise InputError(
            None, f"config '{SECTION}': unknown key(s) {', '.join(unknown)}; known keys: {', '.join(KEYS)}"
        )
    prompt = settings.prompt
    if "system_prompt" in section:
        prompt = dataclasses.replace(prompt, system_prompt=_optional_str(section, "system_prompt"))
    if "icd_template" in section:
        prompt = dataclasses.replace(prompt, icd_template=_template(section, "icd_template", needs_answer=True))
    if "query_template" in section:
        prompt = dataclasses.replace(prompt, query_template=_template(section, "query_template", needs_answer=False))
    updates: dict[str, Any] = {"prompt": prompt}
    if "generation" in section:
        updates["generation"] = {**settings.generation, **_generation(section["generation"])}
    if "path" in section:
        updates["path"] = _optional_str(section, "path")
    if section.get("batch_size") is not None:
        updates["batch_size"] = _positive_int(section["batch_size"], f"config '{SECTION}.batch_size'")
    if section.get("image_cache_mb") is not None:
        updates["image_cache_mb"] = _non_negative_int(section["image_cache_mb"], f"config '{SECTION}.image_cache_mb'")
    if "prefetch_threads" in section:
        where = f"config '{SECTION}.prefetch_threads'"
        updates["prefetch_threads"] = _non_negative_int(section["prefetch_threads"], where)
    if "processor_kwargs" in section:
        updates["processor_kwargs"] = _mapping(section["processor_kwargs"], f"{SECTION}.processor_kwargs")
    for key in ("dtype", "attn_implementation", "vision_attn_implementation"):
        if key in section:
            updates[key] = _optional_str(section, key)
    if model_path is not None:
        updates["path"] = str(model_path)
    if batch_size is not None:
        updates["batch_size"] = _positive_int(batch_size, "the VQA batch size")
    return dataclasses.replace(settings, **updates)


def _section(config: dict | None) -> dict:
    return {} if config is None else config_section(config, SECTION)


def _optional_str(section: dict, key: str) -> str | None:
    value = section[key]
    if value is not None and not isinstance(value, str):
        raise InputError(None, f"config '{SECTION}.{key}' must be a string or null, found {value!r}")
    return value


def _template(section: dict, key: str, needs_answer: bool) -> str:
    value = section[key]
    if not isinstance(value, str) or "{question}" not in value:
        raise InputError(None, f"config '{SECTION}.{key}' must be a string containing {{question}}, found {value!r}")
    if needs_answer and "{answer}" not in value:
        raise InputError(None, f"config '{SECTION}.{key}' must contain {{answer}} (the ICD's answer), found {value!r}")
    return value


def _generation(value: Any) -> dict[str, Any]:
    """Validated `generate` keyword arguments: the four of docs/formats.md §5 by type, others by name."""
    from transformers import GenerationConfig

    where = f"{SECTION}.generation"
    generation = _mapping(value, where)
    known = GenerationConfig().to_dict()
    for key in generation:
        if key not in known:
            raise InputError(None, f"config '{where}': '{key}' is not a generation setting of transformers")
    for key in ("max_new_tokens", "num_beams"):
        if key in generation:
            _positive_int(generation[key], f"config '{where}.{key}'")
    if "length_penalty" in generation and not is_json_number(generation["length_penalty"]):
        raise InputError(
            None, f"config '{where}.length_penalty' must be a number, found {generation['length_penalty']!r}"
        )
    if "do_sample" in generation and not isinstance(generation["do_sample"], bool):
        raise InputError(None, f"config '{where}.do_sample' must be true or false, found {generation['do_sample']!r}")
    if generation.get("num_return_sequences", 1) != 1:
        raise InputError(None, f"config '{where}.num_return_sequences' must be 1: one answer is scored per candidate")
    return generation


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(None, f"config '{where}' must be a mapping, found {value!r}")
    return dict(value)


def _positive_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(None, f"{what} must be a positive integer, found {value!r}")
    return value


def _non_negative_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(None, f"{what} must be a non-negative integer, found {value!r}")
    return value
