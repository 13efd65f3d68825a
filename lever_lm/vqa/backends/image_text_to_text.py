"""Generic backend: any chat VLM that `AutoModelForImageTextToText` loads and whose processor has a chat template.

    --vqa_model hf_image_text_to_text --vqa_model_path /models/<a chat VLM>   (or vqa_model.path in --config)

Each prompt becomes the chat of `prompts.chat_messages`, rendered by the model's own chat
template; a batch of prompts goes through the processor with left padding and one
`model.generate` call with the configured decoding (docs/formats.md §5). Decoding
settings not given in the config come from the model's `generation_config.json`, as with any
`generate` call. Decoded images are cached per path (`images.ImageCache`); the processor resizes
and normalises them per batch, since how to split a batch's processed pixels back per image differs
between model families -- `qwen2_5_vl` caches the finished per-image work for its family.

The chat is rendered and tokenised by `chat_encoding.ChatEncoder`, so the text of a control token
inside a question, answer, template or system prompt is plain text, never the token.

Asked for replies (`generate(prompts, replies)`), the backend also gives each prompt the
teacher-forced log-probability of each reply (`reply_likelihood`). Generation runs exactly as
without replies, so the answers are the same; then the prompts' part of the KV cache generation
leaves (every beam row of a prompt holds the same prompt) is cut back to each prompt but its last
token, and all the batch's replies are scored as one batch of continuations from it. The prompts
are read once, by generation, and the likelihoods cost only the replies' own tokens.
`score_replies(prompts, replies)` gives the same likelihoods without generating (InfoScore needs
only those): the prompts are prefilled, then the replies continue from that cache as above.

This class is also the base of the Qwen2.5-VL backend, which overrides how a batch is encoded
(`_prepare_image`, `_encode`) and turns `share_prefill` on.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lever_lm.errors import InputError
from lever_lm.vqa.backends.base import (
    Generation,
    ReplyScores,
    bind_device,
    default_dtype,
    describe_numerics,
    resolve_device,
)
from lever_lm.vqa.backends.batched import BatchedBackend
from lever_lm.vqa.backends.chat_encoding import ChatEncoder
from lever_lm.vqa.backends.reply_likelihood import TEXT_KEYS, prompt_cache, reply_logprobs
from lever_lm.vqa.model_config import VQAModelSettings, resolve_settings
from lever_lm.vqa.prompts import FewShotPrompt, chat_messages

log = logging.getLogger(__name__)
NAME = "hf_image_text_to_text"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
NO_REPLY_TOKENS = "the chat template does not let the reply's tokens be told apart (see the warning)"


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready to batch: its chat rendered to text, its images as the cache holds them, and the
    tokens of each reply to score (its tokens and the end-of-turn token; None: no replies asked)."""

    text: str  # control-token text inside the user's strings escaped (chat_encoding)
    images: tuple[Any, ...]
    reply_tokens: tuple[tuple[int, ...], ...] | None = None
    image_paths: tuple[Path, ...] = ()  # which pictures `images` are (a shared prefix must show the same ones)


class ImageTextToTextBackend(BatchedBackend):
    """Batched few-shot VQA with a Hugging Face chat VLM (see the module doc)."""

    share_prefill = False  # beam search from one prefill per prompt (see the Qwen2.5-VL backend)

    def __init__(self, name: str, model, processor, settings: VQAModelSettings, device: torch.device, model_path: Path):
        super().__init__(name, model, settings, device, model_path)
        settings = self.settings
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row at the same last column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.generation_kwargs = {"pad_token_id": self.tokenizer.pad_token_id, **settings.generation}
        self.chat = ChatEncoder(processor)
        forward_parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        self._prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
        self._reply_warnings: set[str] = set()

    # -- the chat ------------------------------------------------------------------------------

    def _prepare(self, prompt: FewShotPrompt, replies: Sequence[str] | None = None) -> PreparedPrompt:
        messages = chat_messages(prompt, self.settings.prompt)
        text = self.chat.render_prompt(messages)
        images = tuple(self.image_cache.get(path) for path in prompt.images)
        reply_tokens = self._reply_tokens(messages, text, replies)
        return PreparedPrompt(text=text, images=images, reply_tokens=reply_tokens, image_paths=prompt.images)

    def _reply_tokens(self, messages: list[dict], text: str, replies: Sequence[str] | None):
        """Each reply's tokens, or None (with a warning, once per reason) when they cannot be told apart."""
        if replies is None:
            return None
        try:
            return self.chat.reply_tokens(messages, text, replies)
        except ValueError as error:  # a ReplyEncodingError, or a reply holding a reserved character
            if str(error) not in self._reply_warnings:
                self._reply_warnings.add(str(error))
                log.warning("no reply likelihoods for prompts of this kind: %s", error)
            return None

    def _generate_texts(self, batch: list[PreparedPrompt]) -> list[Generation]:
        """Each prompt's Generation: the decoded answer and, where asked, its replies' log-probabilities.

        With `share_prefill` (and beams), beam search starts from one prefill per prompt instead of
        one per beam. Replies are scored after generation, from the prompts' part of the cache
        generation leaves: the very prompt the answers came from, read once.
        """
        inputs = self._encode(batch)
        beams = self.generation_kwargs.get("num_beams", 1)
        generation_kwargs = {**self.generation_kwargs, "return_dict_in_generate": True}
        with torch.inference_mode():
            if self.share_prefill and beams > 1:
                cache = self._prefill(inputs)
                cache.batch_repeat_interleave(beams)  # row b -> rows b*beams .. b*beams+beams-1, as generate expands
                text_inputs = {key: inputs[key] for key in TEXT_KEYS if key in inputs}
                output = self.model.generate(**text_inputs, **{self._cache_argument: cache}, **generation_kwargs)
            else:
                output = self.model.generate(**inputs, **generation_kwargs)
            logprobs = self._reply_logprobs(
                batch, lambda: (self._generation_cache(output, inputs), inputs), max_rows=len(batch) * beams
            )
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Generation.from_raw(text, reply_logprobs=scores) for text, scores in zip(texts, logprobs)]

    def _score_texts(self, batch: list[PreparedPrompt]) -> list[ReplyScores]:
        """Each prompt's replies scored by teacher forcing, no generation: the prompts are prefilled
        (`_scoring_prefill`: their common prefix once where the backend can) and the replies
        continue from that cache, exactly as after generation (`reply_likelihood`)."""
        inputs = self._encode(batch)
        with torch.inference_mode():
            logprobs = self._reply_logprobs(batch, lambda: self._scoring_prefill(inputs, batch), max_rows=len(batch))
        return [
            ReplyScores.failed(NO_REPLY_TOKENS)
            if scores is None
            else ReplyScores(scores, tuple(len(tokens) for tokens in prepared.reply_tokens))
            for prepared, scores in zip(batch, logprobs)
        ]

    def _generation_cache(self, output, inputs: dict):
        """The prompts' cache that generation left, cut back; a prefill of their own when it cannot be."""
        cache = prompt_cache(output, inputs["input_ids"].shape)
        return cache if cache is not None else self._prefill(inputs)

    def _scoring_prefill(self, inputs: dict, batch: list[PreparedPrompt]) -> tuple[Any, dict]:
        """The prefill `_score_texts` continues from, and the inputs in that cache's layout. Here the
        plain prefill of every prompt: for an arbitrary chat VLM the processor lays out a batch's
        pixels in a model-specific way that cannot be split per image, and models place positions by
        rules of their own. The Qwen2.5-VL backend, which holds each image's features and knows
        its positions, runs the batch's common prefix once."""
        return self._prefill(inputs), inputs

    def _prefill(self, inputs: dict):
        """The KV cache of each prompt but its last token: images, cache and the model's position offsets
        (kept by Qwen2.5-VL for the steps that follow) come from here; the last token is plain text."""
        prefix = {key: value[:, :-1] if key in TEXT_KEYS else value for key, value in inputs.items()}
        output = self.model(**prefix, use_cache=True, **self._prefill_kwargs)
        return getattr(output, self._cache_argument)

    def _reply_logprobs(self, batch: list[PreparedPrompt], prefill: Callable[[], tuple], max_rows: int) -> list:
        """Per prompt: its replies' log-probabilities in order, or None when none were asked (or possible).
        Each distinct (prompt, reply tokens) is scored once, continuing from the prompts' cache that
        `prefill()` gives with the inputs in its layout (made only when there is a reply to score)."""
        rows = list(dict.fromkeys((b, tokens) for b, p in enumerate(batch) for tokens in p.reply_tokens or ()))
        scores = []
        if rows:
            cache, inputs = prefill()
            scores = reply_logprobs(
                self.model,
                cache,
                inputs,
                rows,
                cache_argument=self._cache_argument,
                pad_token_id=self.tokenizer.pad_token_id,
                max_rows=max(1, max_rows),
            )
        by_row = dict(zip(rows, scores))
        return [
            None if p.reply_tokens is None else tuple(by_row[(b, tokens)] for tokens in p.reply_tokens)
            for b, p in enumerate(batch)
        ]

    def _memory_advice(self) -> str:
        return (
            f"vqa_model.image_cache_mb (now {self.image_cache.max_bytes // 2**20} MB), the image size "
            "(vqa_model.processor_kwargs: {size: {longest_edge: ...}}, the max_pixels), or vqa_model.dtype "
            "(now " + str(self.model.dtype).removeprefix("torch.") + "); --batch_size is already down to 1"
        )

    # -- what the Qwen2.5-VL backend overrides ---------------------------------------------------

    def _encode(self, batch: list[PreparedPrompt]) -> dict:
        """The `generate` inputs of a batch: the processor does text, padding and pixels."""
        texts = [prepared.text for prepared in batch]
        inputs = self.chat.processor_for(texts)(
            text=texts,
            images=[list(prepared.images) for prepared in batch],
            padding=True,
            return_tensors="pt",
            **self.settings.processor_kwargs,
        )
        return _to_model(inputs, self.device, self.model.dtype)


def _to_model(inputs, device: torch.device, dtype: torch.dtype) -> dict:
    """Every tensor to the model's device; floating ones (pixels) to its dtype too."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        moved[key] = value
    return moved


# -- loading ---------------------------------------------------------------------------------------


def check_model_dir(path: Path) -> Path:
    """A local Hugging Face model directory with a config and weights, or an InputError saying what is missing."""
    if not path.exists():
        raise InputError(path, "model directory not found")
    if not path.is_dir():
        raise InputError(path, "expected a model directory, found a file")
    if not (path / "config.json").is_file():
        raise InputError(path, "not a Hugging Face model directory: no config.json")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise InputError(path, "no model weights in the directory (*.safetensors or *.bin)")
    return path


def model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as error:
        raise InputError(path / "config.json", f"unreadable model config: {error}") from None


def load_model_and_processor(path: Path, device: torch.device, settings: VQAModelSettings):
    """Model (eval mode, on `device`, bf16 on CUDA / fp32 on CPU) and processor, never from the network."""
    from transformers import AutoModelForImageTextToText

    from lever_lm.vqa.backends.processor import load_processor

    dtype = default_dtype(device, settings.dtype)
    bind_device(device)
    attention = attn_implementation(settings)
    extra = {"attn_implementation": attention} if attention else {}
    try:
        processor = load_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as error:
        raise InputError(path, f"cannot load as an image-text-to-text model: {type(error).__name__}: {error}") from None
    if getattr(processor, "chat_template", None) is None:
        raise InputError(path, "the processor has no chat template; chat prompts cannot be built for this model")
    return model.to(device).eval(), processor


def describe_settings(name: str, *, model_path: str | None, config: dict | None, device: str) -> dict:
    """What shapes this backend's answers, without loading the model (see `describe_chat_model`)."""
    settings = resolve_settings("chat", config, model_path=model_path)
    if settings.path is None:
        raise InputError(
            None, f"--vqa_model {name} needs a model directory: set --vqa_model_path or vqa_model.path in --config"
        )
    path = check_model_dir(Path(settings.path))
    return describe_chat_model(name, path, settings, device, image_processor=_auto_image_processor())


def describe_chat_model(name: str, path: Path, settings: VQAModelSettings, device: str, image_processor: str) -> dict:
    """The fingerprint of a chat VLM run: model content, prompt, decoding, image processing, numerics."""
    from lever_lm.vqa.backends import model_identity

    return {
        "vqa_model": name,
        "model": model_identity(path),
        "prompt": asdict(settings.prompt),
        "generation": dict(settings.generation),
        "processor_kwargs": dict(settings.processor_kwargs),
        "image_processor": image_processor,
        "numerics": describe_numerics(device, settings.dtype, attn_implementation(settings)),
    }


def _auto_image_processor() -> str:
    """Which image processors `AutoProcessor` picks: the torchvision ones when it is installed."""
    import importlib.util

    return "auto, torchvision " + ("present" if importlib.util.find_spec("torchvision") else "absent")


def attention_in_use(model) -> dict[str, str | None]:
    """The attention implementation each part of a loaded model runs (they change answers slightly)."""
    config = model.config
    parts = {"text": config.get_text_config()}
    if getattr(config, "vision_config", None) is not None:
        parts["vision"] = config.vision_config
    return {name: getattr(part, "_attn_implementation", None) for name, part in parts.items()}


def attn_implementation(settings: VQAModelSettings) -> str | dict | None:
    """The `attn_implementation` argument: one for the whole model, or one per part when the vision
    tower has its own (`vision_attn_implementation`)."""
    if settings.vision_attn_implementation is None:
        return settings.attn_implementation
    return {"vision_config": settings.vision_attn_implementation, "text_config": settings.attn_implementation}


def load(
    name: str = NAME,
    *,
    model_path: str | None = None,
    device: str = "cpu",
    config: dict | None = None,
    batch_size: int | None = None,
) -> ImageTextToTextBackend:
    """The generic backend for the model directory given by `model_path` or `vqa_model.path`."""
    settings = resolve_settings("chat", config, model_path=model_path, batch_size=batch_size)
    if settings.path is None:
        raise InputError(
            None, f"--vqa_model {name} needs a model directory: set --vqa_model_path or vqa_model.path in --config"
        )
    torch_device = resolve_device(device)
    path = check_model_dir(Path(settings.path))
    model, processor = load_model_and_processor(path, torch_device, settings)
    return ImageTextToTextBackend(name, model, processor, settings, torch_device, path)
