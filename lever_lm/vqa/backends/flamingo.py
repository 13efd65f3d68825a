"""OpenFlamingo-3B backend (`--vqa_model flamingo_3B`): the project's own port of the model (`lever_lm.vqa.flamingo`).

    --vqa_model flamingo_3B --vqa_model_path <dir>     (or vqa_model.path in --config)

`<dir>` holds `checkpoint.pt` (openflamingo/OpenFlamingo-3B-vitl-mpt1b), `lang_encoder/`
(anas-awadalla/mpt-1b-redpajama-200b with its tokenizer) and `vision_encoder/`
(openai/clip-vit-large-patch14); see `lever_lm.vqa.flamingo.loading` and the README.

Each prompt is `<image>Question:{q} Short answer:{a}<|endofchunk|>` per ICD, then the query
(`prompts.flamingo_text`, template from `vqa_model`), decoded with the project's settings (3 beams,
5 new tokens, no length penalty) until `<|endofchunk|>`. Per distinct image the CLIP tower and the
perceiver run once; the cache keeps the 64 resampled latents on the model's device. A batch then
only tokenizes (left padding), stacks each prompt's latents and calls `generate`.

Scoring a given reply instead (its log-probability after the prompt) is one forward pass of
`OpenFlamingo` over prompt + reply, reading the reply tokens' log-softmax: `_encode` gives the
inputs, `model(...)` the logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lever_lm.errors import InputError
from lever_lm.vqa.backends.base import (
    BatchRunner,
    DeviceOutOfMemory,
    Failed,
    Generation,
    GenerationAborted,
    default_dtype,
    describe_numerics,
    resolve_device,
)
from lever_lm.vqa.backends.memory import resolve_memory_settings
from lever_lm.vqa.flamingo.generation import FlamingoForGeneration
from lever_lm.vqa.flamingo.loading import LoadedFlamingo, clip_pixels, load_openflamingo, locate_files
from lever_lm.vqa.images import ImageCache, UnreadableImage
from lever_lm.vqa.model_config import VQAModelSettings, resolve_settings
from lever_lm.vqa.prompts import FewShotPrompt, flamingo_text

NAME = "flamingo_3B"
FAMILY = "flamingo"


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready to batch: its text and the cached latents of its images ([64, Dv] each)."""

    text: str
    media: tuple[torch.Tensor, ...]


class FlamingoBackend:
    """Batched few-shot VQA with OpenFlamingo (see the module doc)."""

    def __init__(self, name: str, loaded: LoadedFlamingo, settings: VQAModelSettings, device: torch.device, path: Path):
        self.name = name
        self.settings = settings = resolve_memory_settings(settings, loaded.model, device)  # batch size, cache
        self.device = device
        self.model_path = path
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.image_size = loaded.image_size
        self.media_token_id = loaded.media_token_id
        self.generator = FlamingoForGeneration(loaded.model, loaded.eoc_token_id, loaded.pad_token_id)
        self.generation_kwargs = {
            "eos_token_id": loaded.eoc_token_id,
            "pad_token_id": loaded.pad_token_id,
            **settings.generation,
        }
        self.image_cache = ImageCache(self._prepare_image, max_bytes=settings.image_cache_mb * 2**20)
        self.batch_runner = BatchRunner(device, settings.batch_size, on_out_of_memory=self.image_cache.shrink)

    # -- the interface -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[FewShotPrompt]) -> list[Generation]:
        """One Generation per prompt, same order, `settings.batch_size` prompts per generate call."""
        results: list[Generation | None] = [None] * len(prompts)
        size = self.batch_size
        for start in range(0, len(prompts), size):
            self._generate_chunk(prompts, range(start, min(start + size, len(prompts))), results)
        return results  # type: ignore[return-value]

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def prefetch(self, prompts: Sequence[FewShotPrompt]) -> None:
        """Nothing ahead of time here: each image is prepared when a batch first needs it."""

    # -- batching ------------------------------------------------------------------------------

    def _generate_chunk(self, prompts: Sequence[FewShotPrompt], indices: range, results: list) -> None:
        ready: list[tuple[int, PreparedPrompt]] = []
        for i in indices:
            try:
                ready.append((i, self._prepare(prompts[i])))
            except UnreadableImage as error:
                results[i] = Generation.failed(str(error))
            except (GenerationAborted, DeviceOutOfMemory):
                raise
            except Exception as error:  # noqa: BLE001 -- e.g. an image the vision tower rejects: this prompt only
                results[i] = Generation.failed(f"preparing the prompt failed: {type(error).__name__}: {error}")
        if not ready:
            return
        outcomes = self.batch_runner.run_with_retry([prepared for _, prepared in ready], self._generate_texts)
        for (i, _), outcome in zip(ready, outcomes):
            failed = isinstance(outcome, Failed)
            results[i] = Generation.failed(outcome.reason) if failed else Generation.from_raw(outcome)
        self.batch_runner.observe([results[i].error for i in indices])

    def _prepare(self, prompt: FewShotPrompt) -> PreparedPrompt:
        text = flamingo_text(prompt, self.settings.prompt)
        return PreparedPrompt(text=text, media=tuple(self.image_cache.get(path) for path in prompt.images))

    def _prepare_image(self, image) -> torch.Tensor:
        """What the cache keeps per image: its 64 resampled latents [64, Dv], on the model's device."""
        dtype = next(self.model.parameters()).dtype
        pixels = clip_pixels(image, self.image_size)[None].to(device=self.device, dtype=dtype)
        with torch.inference_mode():
            return self.model.encode_images(pixels)[0]

    def _generate_texts(self, batch: list[PreparedPrompt]) -> list[str]:
        inputs = self._encode(batch)
        prompt_length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            output = self.generator.generate(**inputs, **self.generation_kwargs)
        return self.tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)

    def _encode(self, batch: list[PreparedPrompt]) -> dict:
        """Left-padded token ids, and each prompt's image latents padded to the batch's most images."""
        tokens = self.tokenizer([prepared.text for prepared in batch], padding=True, return_tensors="pt")
        input_ids = tokens["input_ids"]
        counts = (input_ids == self.media_token_id).sum(dim=1).tolist()
        for prepared, count in zip(batch, counts):
            if count != len(prepared.media):
                raise ValueError(f"the prompt has {count} <image> tokens for {len(prepared.media)} images")
        most = max(len(prepared.media) for prepared in batch)
        first = batch[0].media[0]
        media = first.new_zeros(len(batch), most, *first.shape)  # [B, T, 64, Dv]
        media_mask = torch.zeros(len(batch), most, dtype=torch.bool, device=self.device)
        for row, prepared in enumerate(batch):
            for column, latents in enumerate(prepared.media):
                media[row, column] = latents
                media_mask[row, column] = True
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": tokens["attention_mask"].to(self.device),
            "media": media,
            "media_mask": media_mask,
        }


# -- loading and identity ----------------------------------------------------------------------------


def model_dir(name: str, settings: VQAModelSettings) -> Path:
    if settings.path is None:
        raise InputError(
            None,
            f"--vqa_model {name} needs a model directory (checkpoint.pt, lang_encoder/, vision_encoder/): "
            "set --vqa_model_path or vqa_model.path in --config (README: 'OpenFlamingo-3B')",
        )
    return Path(settings.path)


def describe_settings(name: str, *, model_path: str | None, config: dict | None, device: str) -> dict:
    """The model's identity (content of its three parts), prompt, decoding and numerics, without loading it."""
    from lever_lm.vqa.backends import model_identity

    settings = resolve_settings(FAMILY, config, model_path=model_path)
    files = locate_files(model_dir(name, settings))
    return {
        "vqa_model": name,
        "model": {
            "checkpoint": model_identity(files.checkpoint),
            "lang_encoder": model_identity(files.lang_dir),
            "vision_encoder": model_identity(files.vision_dir),
        },
        "prompt": asdict(settings.prompt),
        "generation": dict(settings.generation),
        "numerics": describe_numerics(device, settings.dtype),
    }


def load(
    name: str = NAME,
    *,
    model_path: str | None = None,
    device: str = "cpu",
    config: dict | None = None,
    batch_size: int | None = None,
) -> FlamingoBackend:
    """The OpenFlamingo backend; InputError before any work when the model cannot be loaded."""
    settings = resolve_settings(FAMILY, config, model_path=model_path, batch_size=batch_size)
    torch_device = resolve_device(device)
    path = model_dir(name, settings)
    loaded = load_openflamingo(path, torch_device, default_dtype(torch_device, settings.dtype))
    return FlamingoBackend(name, loaded, settings, torch_device, path)
