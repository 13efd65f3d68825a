"""A brief, deterministic training of the demo's tiny Qwen2.5-VL, so that its answers mean something.

With random weights the demo VLM answers nonsense: every candidate scores 0 and every GRPO group
is flat. This module trains that same tiny model (same architecture, same files, loaded the same
way) on the demo TRAINING split, in two phases:

1. Vision warm-up. The vision tower, with a throw-away linear head on its mean image feature,
   learns to tell the answer of an item from its picture (restricted to the answers seen for the
   item's question type). Trained jointly with the language model from scratch, the tiny vision
   tower collapses (its features grow and become alike) before the language model learns to read
   them; trained on its own it learns colours, sides and shapes in seconds.
2. Few-shot answering, in exactly the prompt format the RL generator scores with. The vision
   tower is frozen (its features are computed once per image); the language model learns to
   answer. A prompt is built by `lever_lm.vqa.prompts.build_prompt` (ICDs with their
   `icd_answer`, then the query), rendered by `lever_lm.vqa.prompts.chat_messages` with the chat
   template and settings of `lever_lm.vqa.model_config`, and its images go through the model's own
   image processor -- what the backend does -- so train and inference prompts cannot drift apart
   (tests/test_train_vlm.py compares the token ids with the backend's). The targets are the
   query's `icd_answer` followed by `<|im_end|>` (so generation stops after the answer) and, for
   free, each ICD's answer (an answer to the question about the image before it).

Which ICDs a training prompt shows decides whether the model learns to look at them. Each ICD slot
is drawn from a mixture (`IcdMix`): any training item, an item of the query's question type, or an
item of the query's type with the query's answer (a helpful demonstration, as a good retriever
finds). With the default 1 : 0 : 4 a same-type ICD's answer is strong evidence for the query's
answer, so the model learns to read the image and the question AND to lean on the
demonstrations: on the demo val split (2 ICDs of the query's type) it scores ~0.64 when they
share the query's answer, ~0.45 when they do not, ~0.57 with no ICD at all -- so different ICD
sequences score differently (non-flat GRPO groups), as with a real VLM. With 0 : 0 : 1 (the
pipeline's setting) it leans harder: ~0.82, ~0.35 and ~0.57. With equal weights it learns to
ignore the ICDs (few non-flat groups).

Cost: about a minute on one CPU thread (the default: the matrices are tiny, and a second thread
gains little and loses much on a shared machine).

Determinism: the seed fixes the head's initial weights and every draw; training runs with a fixed
number of intra-op threads and `torch.use_deterministic_algorithms(True)`. The same seed on the
same machine (same torch build, same thread count) gives bit-identical weights; across machines
or torch builds float summation order may differ, so weights agree only to rounding.

    python -m lever_lm.demo.train_vlm --base_model data/demo/models/qwen2.5-vl-tiny \\
        --out data/demo/models/qwen2.5-vl-demo --train_ques_path ... --train_ann_path ... --train_image_root ...
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
from lever_lm.data.vqa import VQADataset
from lever_lm.errors import InputError, exit_on_input_error
from lever_lm.vqa.images import read_rgb
from lever_lm.vqa.model_config import VQAModelSettings, resolve_settings
from lever_lm.vqa.prompts import FewShotPrompt, build_prompt, chat_messages, fill

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class IcdMix:
    """Relative weights of where an ICD slot's item comes from (normalised when drawing)."""

    random: float = 1.0  # any training item
    same_type: float = 0.0  # an item with the query's question type
    same_answer: float = 4.0  # an item with the query's question type and answer

    def __post_init__(self):
        weights = (self.random, self.same_type, self.same_answer)
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise InputError(None, f"ICD mix weights must be >= 0 with a positive sum, got {list(weights)}")


@dataclass(frozen=True)
class TrainSettings:
    """Everything besides the base model and the data set that shapes the trained weights."""

    vision_steps: int = 300  # phase 1
    vision_batch_size: int = 32
    vision_lr: float = 3e-3
    steps: int = 400  # phase 2
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 20
    shot_num: int = 2
    mix: IcdMix = field(default_factory=IcdMix)
    train_on_icd_answers: bool = True
    seed: int = 0
    num_threads: int = 1


@dataclass(frozen=True)
class TrainSummary:
    out_dir: Path
    vision_losses: list[float]  # per phase-1 step
    losses: list[float]  # per phase-2 step
    seconds: float


# -- what a training example is -------------------------------------------------------------------


class IcdSampler:
    """Draws the ICD rows of a training prompt from the `IcdMix` (never the query, no repeats)."""

    def __init__(self, dataset: VQADataset, mix: IcdMix):
        self.weights = (mix.random, mix.same_type, mix.same_answer)
        self.dataset = dataset
        self.rows = list(range(len(dataset)))
        self.by_type: dict[str | None, list[int]] = {}
        self.by_answer: dict[tuple[str | None, str], list[int]] = {}
        for row in self.rows:
            item = dataset[row]
            self.by_type.setdefault(item.question_type, []).append(row)
            self.by_answer.setdefault((item.question_type, item.icd_answer), []).append(row)

    def sample(self, rng: random.Random, query: int, shot_num: int) -> list[int]:
        item = self.dataset[query]
        pools = (self.rows, self.by_type[item.question_type], self.by_answer[(item.question_type, item.icd_answer)])
        picked: list[int] = []
        while len(picked) < shot_num:
            pool = rng.choices(pools, weights=self.weights)[0]
            allowed = [row for row in pool if row != query and row not in picked]
            if not allowed:  # e.g. the query is the only item with its answer
                allowed = [row for row in self.rows if row != query and row not in picked]
            picked.append(rng.choice(allowed))
        return picked


def training_prompt(dataset: VQADataset, query: int, icds: Sequence[int]) -> FewShotPrompt:
    """The generator's prompt of this query and ICD sequence (the same function builds both)."""
    return build_prompt(dataset, query, icds)


class QueryOrder:
    """Training queries epoch by epoch, each epoch a fresh shuffle of all rows."""

    def __init__(self, num_rows: int, rng: random.Random):
        self.num_rows, self.rng, self.pending = num_rows, rng, []

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            if not self.pending:
                self.pending = list(range(self.num_rows))
                self.rng.shuffle(self.pending)
            out.append(self.pending.pop())
        return out


# -- images: processed once, as the backend processes them ---------------------------------------


@dataclass
class TrainingImage:
    grid_thw: Tensor  # [1, 3]
    pixel_values: Tensor  # [patches, C*T*P*P]
    features: Tensor | None = None  # [tokens, hidden], once the vision tower is frozen


class TrainingImages:
    """Per image path: processed pixels, and the frozen vision tower's features once `freeze` is called."""

    def __init__(self, processor, settings: VQAModelSettings):
        self.processor = processor
        self.settings = settings
        self.model = None
        self._images: dict[Path, TrainingImage] = {}

    def get(self, path: Path) -> TrainingImage:
        image = self._images.get(path)
        if image is None:
            processed = self.processor.image_processor(
                images=[read_rgb(path)], return_tensors="pt", **self.settings.processor_kwargs
            )
            image = TrainingImage(grid_thw=processed["image_grid_thw"], pixel_values=processed["pixel_values"])
            self._images[path] = image
        if self.model is not None and image.features is None:
            with torch.no_grad():
                output = self.model.get_image_features(image.pixel_values, image.grid_thw, return_dict=True)
            image.features = output.pooler_output[0]
        return image

    def freeze(self, model) -> None:
        """From now on images carry the features of `model`'s vision tower, which is no longer trained."""
        for parameter in model.model.visual.parameters():
            parameter.requires_grad_(False)
        self.model = model


# -- phase 1: vision warm-up ------------------------------------------------------------------------


def warm_up_vision(
    model, dataset: VQADataset, images: TrainingImages, settings: TrainSettings, rng: random.Random
) -> list[float]:
    """Train the vision tower to tell each item's answer from its picture (see the module doc)."""
    answers = sorted({dataset[row].icd_answer for row in range(len(dataset))})
    types = sorted({str(dataset[row].question_type) for row in range(len(dataset))})
    # Only the answers seen for a question type compete: "red" is no answer to "how many".
    allowed = torch.full((len(types), len(answers)), float("-inf"))
    for row in range(len(dataset)):
        allowed[types.index(str(dataset[row].question_type)), answers.index(dataset[row].icd_answer)] = 0.0
    head = torch.nn.Linear(model.config.vision_config.out_hidden_size, len(answers))
    parameters = list(model.model.visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.vision_lr, weight_decay=0.0)
    schedule = _schedule(optimizer, settings.vision_steps, settings.warmup_steps)
    order = QueryOrder(len(dataset), rng)
    losses = []
    for _ in range(settings.vision_steps):
        rows = order.take(settings.vision_batch_size)
        batch = [images.get(dataset.image_path(row)) for row in rows]
        output = model.get_image_features(
            torch.cat([image.pixel_values for image in batch]),
            torch.cat([image.grid_thw for image in batch]),
            return_dict=True,
        )
        pooled = torch.stack([features.mean(dim=0) for features in output.pooler_output])
        logits = head(pooled) + allowed[[types.index(str(dataset[row].question_type)) for row in rows]]
        targets = torch.tensor([answers.index(dataset[row].icd_answer) for row in rows])
        loss = torch.nn.functional.cross_entropy(logits, targets)
        _step(optimizer, schedule, loss)
        losses.append(loss.item())
    return losses


# -- phase 2: few-shot answering, encoded exactly as at generation time ----------------------------


class PromptEncoder:
    """Few-shot prompts + target answers -> model inputs, with the backend's text and image handling."""

    def __init__(
        self, processor, settings: VQAModelSettings, images: TrainingImages, train_on_icd_answers: bool = True
    ):
        self.processor = processor
        self.settings = settings
        self.images = images
        self.train_on_icd_answers = train_on_icd_answers
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge_size = processor.image_processor.merge_size
        self.end_ids = self.tokenizer(self.tokenizer.eos_token, add_special_tokens=False)["input_ids"]

    def chat_text(self, prompt: FewShotPrompt) -> str:
        """The rendered chat, as the backend renders it (`ImageTextToTextBackend._prepare`)."""
        messages = chat_messages(prompt, self.settings.prompt)
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompt: FewShotPrompt) -> tuple[list[int], list[int], list[TrainingImage]]:
        """The prompt's token ids (image pads expanded), labels on its ICD answers, and its images."""
        images = [self.images.get(path) for path in prompt.images]
        text = self._expand_image_tokens(self.chat_text(prompt), images)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [IGNORE_INDEX] * len(ids)
        if self.train_on_icd_answers:
            spans = self._icd_answer_spans(text, prompt)
            for i, (start, end) in enumerate(encoded["offset_mapping"]):
                if end > start and any(a <= start and end <= b for a, b in spans):
                    labels[i] = ids[i]
        return ids, labels, images

    def encode(self, prompts: Sequence[FewShotPrompt], answers: Sequence[str]) -> dict:
        """A right-padded batch; `labels` hold the answer tokens to learn (IGNORE_INDEX elsewhere)."""
        rows, images = [], []
        for prompt, answer in zip(prompts, answers):
            ids, labels, row_images = self.prompt_ids(prompt)
            target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + self.end_ids
            rows.append((ids + target, labels + target))
            images += row_images
        length = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows]),
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32),
            "image_grid_thw": torch.cat([image.grid_thw for image in images]),
            "image_features": tuple(image.features for image in images),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * (length - len(labels)) for _, labels in rows]),
        }

    def _expand_image_tokens(self, text: str, images: list[TrainingImage]) -> str:
        """Each image pad repeated as many times as its image has tokens (what the Qwen2.5-VL processor does)."""
        pieces = text.split(self.image_token)
        if len(pieces) != len(images) + 1:
            raise ValueError(f"the chat text has {len(pieces) - 1} image tokens for {len(images)} images")
        out = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            out += [self.image_token * (int(image.grid_thw.prod()) // self.merge_size**2), piece]
        return "".join(out)

    def _icd_answer_spans(self, text: str, prompt: FewShotPrompt) -> list[tuple[int, int]]:
        """Character spans of the ICD answers in the rendered text, found in prompt order."""
        template = self.settings.prompt.icd_template
        before_answer = template.split("{answer}", 1)[0]
        spans, position = [], 0
        for shot in prompt.shots:
            filled = fill(template, shot.question, shot.answer)
            start = text.index(filled, position)
            answer_start = start + len(fill(before_answer, shot.question))
            spans.append((answer_start, answer_start + len(shot.answer or "")))
            position = start + len(filled)
        return spans


def answer_loss(model, batch: dict) -> Tensor:
    """Mean cross-entropy of the labelled tokens, each predicted from the tokens before it.

    The model's own forward pass over the whole batch (the reference); `shared_prefix_loss` computes
    the same value faster and is what training uses (the tests check that both agree).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=batch["image_features"])},
    ).logits
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def shared_prefix_loss(model, batch: dict) -> Tensor:
    """`answer_loss`, with the text that starts every row (the system turn) run once, not once per row."""
    hidden = shared_prefix_hidden(model, batch)
    targets = batch["labels"][:, 1:]
    picked = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][picked]), targets[picked])


def shared_prefix_hidden(model, batch: dict) -> Tensor:
    """The language model's last hidden states [B, L, h], the text that starts every row run once.

    Every prompt begins with the same ~130 tokens of system prompt, more than half of each row.
    Its keys and values are computed for one row and repeated for the batch (gradients flow
    through the repeat); the rest of each row attends to them, at the 3D rotary positions the
    model computes for the whole row -- the same function as the full pass, at half the cost.
    """
    core = model.model
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    positions, _ = core.get_rope_index(
        input_ids,
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=mask,
    )  # [3, B, L]
    prefix = _shared_text_prefix(input_ids, batch["mm_token_type_ids"])
    text_model = core.language_model
    embed = text_model.get_input_embeddings()
    cache_argument = "cache" if "cache" in inspect.signature(text_model.forward).parameters else "past_key_values"
    head = text_model(
        inputs_embeds=embed(input_ids[:1, :prefix]), position_ids=positions[:, :1, :prefix], use_cache=True
    )
    cache = getattr(head, cache_argument, None) or head.past_key_values
    cache.batch_repeat_interleave(input_ids.shape[0])
    rest = input_ids[:, prefix:]
    embeds = embed(rest)
    image_mask = (rest == core.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, torch.cat(batch["image_features"]).to(embeds.dtype))
    tail = text_model(
        inputs_embeds=embeds,
        position_ids=positions[:, :, prefix:],
        attention_mask=mask,
        use_cache=True,
        **{cache_argument: cache},
    )
    return torch.cat([head.last_hidden_state.expand(input_ids.shape[0], -1, -1), tail.last_hidden_state], dim=1)


def _shared_text_prefix(input_ids: Tensor, mm_token_type_ids: Tensor) -> int:
    """Length of the longest prefix that all rows share and that holds no image token (1 at least)."""
    same = (input_ids == input_ids[:1]).all(dim=0) & (mm_token_type_ids == 0).all(dim=0)
    differing = (~same).nonzero()
    length = int(differing[0]) if len(differing) else input_ids.shape[1] - 1
    return max(1, min(length, input_ids.shape[1] - 1))


def train_few_shot(
    model, dataset: VQADataset, encoder: PromptEncoder, settings: TrainSettings, rng: random.Random
) -> list[float]:
    """Train the language model (vision frozen) on few-shot prompts of the training split."""
    sampler = IcdSampler(dataset, settings.mix)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    schedule = _schedule(optimizer, settings.steps, settings.warmup_steps)
    order = QueryOrder(len(dataset), rng)
    losses = []
    for _ in range(settings.steps):
        queries = order.take(settings.batch_size)
        prompts = [training_prompt(dataset, q, sampler.sample(rng, q, settings.shot_num)) for q in queries]
        loss = shared_prefix_loss(model, encoder.encode(prompts, [dataset[q].icd_answer for q in queries]))
        _step(optimizer, schedule, loss)
        losses.append(loss.item())
    return losses


# -- the whole training -----------------------------------------------------------------------------


def train_demo_vlm(
    base_model_dir: str | Path, dataset: VQADataset, out_dir: str | Path, settings: TrainSettings = TrainSettings()
) -> TrainSummary:
    """Train the base model on `dataset` (both phases, see the module doc) and save it to `out_dir`."""
    from lever_lm.vqa.backends.image_text_to_text import check_model_dir, load_model_and_processor

    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    _check_settings(settings, dataset)
    vqa_settings = resolve_settings("chat")
    start = time.perf_counter()
    with deterministic_torch(settings.num_threads):
        model, processor = load_model_and_processor(check_model_dir(base_model_dir), torch.device("cpu"), vqa_settings)
        model.train()
        rng = random.Random(settings.seed)
        torch.manual_seed(settings.seed)
        images = TrainingImages(processor, vqa_settings)
        vision_losses = warm_up_vision(model, dataset, images, settings, rng)
        log.info(
            "vision warm-up: %d steps, loss %.3f -> %.3f, %.0f s",
            settings.vision_steps,
            _mean(vision_losses[:20]),
            _mean(vision_losses[-20:]),
            time.perf_counter() - start,
        )
        images.freeze(model)
        encoder = PromptEncoder(processor, vqa_settings, images, settings.train_on_icd_answers)
        losses = train_few_shot(model, dataset, encoder, settings, rng)
        log.info(
            "few-shot training: %d steps, loss %.3f -> %.3f, %.0f s",
            settings.steps,
            _mean(losses[:20]),
            _mean(losses[-20:]),
            time.perf_counter() - start,
        )
        model.eval()
        save_trained_model(model, base_model_dir, out_dir, settings)
    return TrainSummary(
        out_dir=out_dir, vision_losses=vision_losses, losses=losses, seconds=time.perf_counter() - start
    )


@contextlib.contextmanager
def deterministic_torch(num_threads: int) -> Iterator[None]:
    """Fixed intra-op threads and deterministic kernels inside the block; the previous state after."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _schedule(optimizer, steps: int, warmup_steps: int):
    """Linear warm-up, then linear decay to zero at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (steps - step) / max(1, steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step(optimizer, schedule, loss: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _check_settings(settings: TrainSettings, dataset: VQADataset) -> None:
    for name in ("vision_batch_size", "steps", "batch_size", "num_threads"):
        if getattr(settings, name) < 1:
            raise InputError(None, f"{name} must be a positive integer, got {getattr(settings, name)}")
    for name in ("vision_steps", "shot_num", "warmup_steps"):
        if getattr(settings, name) < 0:
            raise InputError(None, f"{name} must be >= 0, got {getattr(settings, name)}")
    for name in ("lr", "vision_lr"):
        if not getattr(settings, name) > 0:
            raise InputError(None, f"{name} must be positive, got {getattr(settings, name)}")
    if settings.shot_num >= len(dataset):
        raise InputError(dataset.questions_path, f"shot_num {settings.shot_num} needs more than {len(dataset)} items")


# -- saving ---------------------------------------------------------------------------------------


def save_trained_model(model, base_model_dir: Path, out_dir: Path, settings: TrainSettings) -> None:
    """The base directory's files with the new weights (and the training settings), written atomically."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        # Training changes no setting: config, generation config, tokenizer, processor and chat
        # template are the base model's files, byte for byte; only the weights are new.
        for path in sorted(base_model_dir.iterdir()):
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copyfile(path, tmp / path.name)
        (tmp / "training_settings.json").write_text(json.dumps(asdict(settings), indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the model is an ordinary readable directory
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; an old `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        description="Train the demo's tiny Qwen2.5-VL on the demo training split, in the RL generator's prompt format."
    )
    parser.add_argument("--base_model", type=Path, required=True, help="the tiny Qwen2.5-VL directory to start from")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the trained model to")
    add_dataset_arguments(parser)
    parser.add_argument(
        "--vision_steps",
        type=int,
        default=defaults.vision_steps,
        help=f"phase-1 steps (default: {defaults.vision_steps})",
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"phase-2 steps (default: {defaults.steps})")
    parser.add_argument(
        "--batch_size",
        type=int,
        default=defaults.batch_size,
        help=f"phase-2 prompts per step (default: {defaults.batch_size})",
    )
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"phase-2 peak learning rate (default: {defaults.lr})"
    )
    parser.add_argument(
        "--shot_num",
        type=int,
        default=defaults.shot_num,
        help=f"ICDs per training prompt (default: {defaults.shot_num})",
    )
    parser.add_argument(
        "--icd_mix",
        type=float,
        nargs=3,
        metavar=("RANDOM", "SAME_TYPE", "SAME_ANSWER"),
        default=[defaults.mix.random, defaults.mix.same_type, defaults.mix.same_answer],
        help="relative weights of an ICD's source: any item, same question type, same type and answer "
        f"(default: {defaults.mix.random:g} {defaults.mix.same_type:g} {defaults.mix.same_answer:g})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"(default: {defaults.seed})")
    parser.add_argument(
        "--num_threads", type=int, default=defaults.num_threads, help=f"torch threads (default: {defaults.num_threads})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_input_error():
        paths = dataset_paths_from_args(args)
        dataset = paths.load()
        settings = TrainSettings(
            vision_steps=args.vision_steps,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            shot_num=args.shot_num,
            mix=IcdMix(*args.icd_mix),
            seed=args.seed,
            num_threads=args.num_threads,
        )
        summary = train_demo_vlm(args.base_model, dataset, args.out, settings)
    log.info("trained in %.1f s; written to %s", summary.seconds, summary.out_dir)


if __name__ == "__main__":
    main()
