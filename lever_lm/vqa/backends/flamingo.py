"""OpenFlamingo-3B backend (`--vqa_model flamingo_3B`): the project's own port of the model (`lever_lm.vqa.flamingo`).

    --vqa_model flamingo_3B --vqa_model_path <dir>     (or vqa_model.path in --config)

`<dir>` holds `checkpoint.pt` (openflamingo/OpenFlamingo-3B-vitl-mpt1b), `lang_encoder/`
(anas-awadalla/mpt-1b-redpajama-200b with its tokenizer) and `vision_encoder/`
(openai/clip-vit-large-patch14); see `lever_lm.vqa.flamingo.loading` and docs/backends.md.

Each prompt is `<image>Question:{q} Short answer:{a}<|endofchunk|>` per ICD, then the query
(`prompts.flamingo_text`, template from `vqa_model`), decoded with the project's settings (3 beams,
5 new tokens, no length penalty) until `<|endofchunk|>`. Questions and answers are plain text: a
question holding `<image>` or `<|endofchunk|>` is tokenised as those characters, never as the
markers (`chat_encoding.ControlTokenText`, as in the chat backends). Per distinct image the CLIP tower and the
perceiver run once; the cache keeps the 64 resampled latents on the model's device. A batch then
only tokenizes (left padding), stacks each prompt's latents and calls `generate`.

Asked for replies (`generate(prompts, replies)`, for `vqa_gt_prob`), each prompt's Generation
also carries the teacher-forced log-probability of each reply: its tokens, then `<|endofchunk|>`
(how the ICDs show an answer), after the prompt's tokens exactly as generation read them.
`score_replies` gives the same without generating (InfoScore). The rows (prompt + reply) of a
batch go through `OpenFlamingo` together; the tokens they all start with (the ICDs a beam already
holds, for InfoScore) run once, and each row's rest continues from a copy of that cache. Unlike
the chat backends no cache is shared with generation, so a reply costs about its prompt's unshared
part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lever_lm.errors import InputError
from lever_lm.vqa.backends.base import Generation, ReplyScores, default_dtype, describe_numerics, resolve_device
from lever_lm.vqa.backends.batched import BatchedBackend
from lever_lm.vqa.backends.chat_encoding import ControlTokenText
from lever_lm.vqa.backends.shared_prefix import shared_prefix_length
from lever_lm.vqa.flamingo.generation import FlamingoForGeneration
from lever_lm.vqa.flamingo.loading import LoadedFlamingo, clip_pixels, load_openflamingo, locate_files
from lever_lm.vqa.flamingo.model import FlamingoCache
from lever_lm.vqa.model_config import VQAModelSettings, resolve_settings
from lever_lm.vqa.prompts import FewShotPrompt, flamingo_text

NAME = "flamingo_3B"
FAMILY = "flamingo"
MIN_SHARED_PREFIX = 2  # tokens; below this the extra forward call costs more than it saves


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready to batch: its text, the cached latents of its images ([64, Dv] each), and the
    tokens of each reply to score (the reply's own tokens, then `<|endofchunk|>`; None: none asked)."""

    text: str
    media: tuple[torch.Tensor, ...]
    reply_tokens: tuple[tuple[int, ...], ...] | None = None
    image_paths: tuple[Path, ...] = ()  # which pictures `media` are (a shared prefix must show the same ones)


class FlamingoBackend(BatchedBackend):
    """Batched few-shot VQA with OpenFlamingo (see the module doc)."""

    def __init__(self, name: str, loaded: LoadedFlamingo, settings: VQAModelSettings, device: torch.device, path: Path):
        super().__init__(name, loaded.model, settings, device, path)
        self.tokenizer = loaded.tokenizer
        self.text = ControlTokenText(loaded.tokenizer)
        self.image_size = loaded.image_size
        self.media_token_id = loaded.media_token_id
        self.eoc_token_id = loaded.eoc_token_id
        self.generator = FlamingoForGeneration(loaded.model, loaded.eoc_token_id, loaded.pad_token_id)
        self.generation_kwargs = {
            "eos_token_id": loaded.eoc_token_id,
            "pad_token_id": loaded.pad_token_id,
            **self.settings.generation,
        }

    def _prepare(self, prompt: FewShotPrompt, replies: Sequence[str] | None = None) -> PreparedPrompt:
        text = flamingo_text(prompt, self.settings.prompt, escape=self.text.escape)
        media = tuple(self.image_cache.get(path) for path in prompt.images)
        reply_tokens = self._reply_tokens(replies)
        return PreparedPrompt(text=text, media=media, reply_tokens=reply_tokens, image_paths=prompt.images)

    def _reply_tokens(self, replies: Sequence[str] | None) -> tuple[tuple[int, ...], ...] | None:
        """A reply as the model would write it after `Short answer:`: its own tokens, then the end of
        the chunk (the ICDs show answers that way: `Short answer:{a}<|endofchunk|>`)."""
        if replies is None:
            return None
        return tuple(tuple(self.text.encode(self.text.escape(r))) + (self.eoc_token_id,) for r in replies)

    def _process_image(self, image) -> torch.Tensor:
        """Host side (thread-safe): CLIP's resize, crop and normalisation, [3, H, W]."""
        return clip_pixels(image, self.image_size)

    def _image_entry(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image's 64 resampled latents [64, Dv], on the model's device (the tower runs alone)."""
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            return self.model.encode_images(pixels[None].to(device=self.device, dtype=dtype))[0]

    def _generate_texts(self, batch: list[PreparedPrompt]) -> list[Generation]:
        inputs = self._encode(batch)
        prompt_length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            output = self.generator.generate(**inputs, **self.generation_kwargs)
            logprobs = self._reply_logprobs(batch, inputs)
        texts = self.tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        return [Generation.from_raw(text, reply_logprobs=scores) for text, scores in zip(texts, logprobs)]

    def _score_texts(self, batch: list[PreparedPrompt]) -> list[ReplyScores]:
        """Each prompt's replies scored by teacher forcing (`_score_rows`), no generation."""
        inputs = self._encode(batch)
        with torch.inference_mode():
            logprobs = self._reply_logprobs(batch, inputs)
        return [
            ReplyScores(scores, tuple(len(tokens) for tokens in prepared.reply_tokens))
            for prepared, scores in zip(batch, logprobs)
        ]

    def _reply_logprobs(self, batch: list[PreparedPrompt], inputs: dict) -> list:
        """Per prompt: the log-probability of each reply after it, by teacher forcing (prompt + reply
        per distinct reply, the prompt's tokens exactly as generation read them; `_score_rows`)."""
        rows = list(dict.fromkeys((b, tokens) for b, p in enumerate(batch) for tokens in p.reply_tokens or ()))
        scores: dict[tuple[int, tuple[int, ...]], float] = {}
        step = max(1, len(batch) * self.generation_kwargs.get("num_beams", 1))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            scores.update(zip(chunk, self._score_rows(chunk, inputs, [batch[b].image_paths for b, _ in chunk])))
        return [
            None if p.reply_tokens is None else tuple(scores[(b, tokens)] for tokens in p.reply_tokens)
            for b, p in enumerate(batch)
        ]

    def _score_rows(self, rows: list[tuple[int, tuple[int, ...]]], inputs: dict, images: list) -> list[float]:
        """Sum of the reply tokens' log-probabilities for each (prompt row, reply tokens), one batch.

        Each row is its prompt's tokens and the reply's, right-padded. The tokens every row starts
        with (up to each prompt's last token, showing the same images: `shared_prefix`) run once,
        for one row, and the rows' rests continue from copies of that cache. Right padding keeps
        the columns of every real token as they are without padding: MPT's ALiBi counts distance
        in columns, so padding between real tokens would change the scores.
        """
        pad = self.generation_kwargs["pad_token_id"]
        prompts = [inputs["input_ids"][b][inputs["attention_mask"][b].bool()] for b, _ in rows]
        sequences = [torch.cat([p, torch.tensor(tokens, device=self.device)]) for p, (_, tokens) in zip(prompts, rows)]
        picks = torch.tensor([b for b, _ in rows], device=self.device)
        media, media_mask = inputs["media"][picks], inputs["media_mask"][picks]
        length = self._shared_length(prompts, images)
        cache = None
        if length:
            cache = FlamingoCache()
            self.model(sequences[0][None, :length], torch.ones_like(sequences[0][None, :length]), media[:1],
                       media_mask[:1], cache)  # fmt: skip
            cache.batch_repeat_interleave(len(rows))
        width = max(len(seq) for seq in sequences) - length
        ids = torch.full((len(rows), width), pad, device=self.device)
        mask = torch.zeros((len(rows), length + width), dtype=torch.long, device=self.device)
        mask[:, :length] = 1
        for r, seq in enumerate(sequences):
            ids[r, : len(seq) - length] = seq[length:]
            mask[r, length : len(seq)] = 1
        logprobs = torch.log_softmax(self.model(ids, mask, media, media_mask, cache).float(), dim=-1)
        out = []
        for r, (seq, (_, tokens)) in enumerate(zip(sequences, rows)):
            end, n = len(seq) - length, len(tokens)
            predicted = logprobs[r, end - n - 1 : end - 1]  # the logits before each reply token
            out.append(float(predicted.gather(1, ids[r, end - n : end, None]).sum()))
        return out

    def _shared_length(self, prompts: list[torch.Tensor], images: list) -> int:
        """The tokens the rows' prompts all start with and that can run once (`shared_prefix`), or 0."""
        if len(prompts) < 2:
            return 0
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt) :] = prompt
            mask[r, width - len(prompt) :] = 1
        length = shared_prefix_length(ids, mask, ids == self.media_token_id, images)
        return length if length >= MIN_SHARED_PREFIX else 0

    def _encode(self, batch: list[PreparedPrompt]) -> dict:
        """Left-padded token ids, and each prompt's image latents padded to the batch's most images."""
        tokens = self.text.tokenize([prepared.text for prepared in batch], padding=True, return_tensors="pt")
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
            "set --vqa_model_path or vqa_model.path in --config (docs/backends.md: 'OpenFlamingo-3B')",
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
