"""CLIP embeddings of the training split (docs/formats.md §3.3): the rows the pointer network reads.

Row i = item i (sorted by question_id) = normalize((normalize(image_emb) + normalize(text_emb)) / 2),
with the CLIP image embedding of the item's picture and the CLIP text embedding of its question.

Cost: VQAv2 train has 443,757 questions on 82,783 pictures, so each picture is decoded and
embedded once and its embedding shared by all its questions; decoding and preprocessing run in a
few threads, a bounded number of batches ahead of the model, so the GPU is not left waiting on
JPEG decoding and memory stays flat. Every image file is checked to exist before the model runs,
so a wrong image root fails in seconds, not after an hour of embedding.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from lever_lm.data.vqa import VQADataset, read_rgb_image
from lever_lm.errors import InputError, short_error

T = TypeVar("T")
R = TypeVar("R")


def export_embeddings(
    dataset: VQADataset,
    model_dir: str | Path,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    num_workers: int | None = None,
) -> Tensor:
    """Float32 [N, d] embeddings of every item of `dataset`, row i = item i, rows of norm 1."""
    image_rows, text_emb = clip_features(dataset, model_dir, batch_size, device, progress, num_workers)
    return combine(image_rows, text_emb)


def clip_features(
    dataset: VQADataset,
    model_dir: str | Path,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    num_workers: int | None = None,
    images: bool = True,
    texts: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """The raw CLIP image and question embeddings [N, d] of every item (row i = item i; the rows of one
    picture share its embedding, computed once); None for the kind not asked for."""
    if batch_size < 1:
        raise InputError(None, f"batch size must be at least 1, got {batch_size}")
    image_ids = list(dict.fromkeys(dataset.image_ids))  # unique, in order of first use
    if images:
        _check_images_exist(dataset, image_ids)
    model, processor = load_clip(model_dir, device)
    image_rows = text_emb = None
    if images:
        workers = num_workers or min(8, os.cpu_count() or 1)
        image_emb = _embed_images(model, processor, dataset, image_ids, batch_size, device, workers, progress)
        row_of_image = {image_id: k for k, image_id in enumerate(image_ids)}
        image_rows = image_emb[torch.tensor([row_of_image[i] for i in dataset.image_ids], dtype=torch.long)]
    if texts:
        text_emb = _embed_texts(model, processor, dataset.questions, batch_size, device, progress)
    return image_rows, text_emb


def combine(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """docs/formats.md §3.3: L2-normalise each, average, L2-normalise again."""
    mean = (F.normalize(image_emb, dim=-1) + F.normalize(text_emb, dim=-1)) / 2
    return F.normalize(mean, dim=-1).to(torch.float32).contiguous()


def load_clip(model_dir: str | Path, device: str):
    """CLIPModel (float32, eval) and its processor from a local directory or the local HF cache."""
    if _looks_like_a_path(model_dir) and not Path(model_dir).is_dir():
        raise InputError(model_dir, "CLIP model directory not found")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        if config.model_type != "clip":
            raise InputError(model_dir, f"is a {config.model_type!r} model, not CLIP")
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
        processor = load_clip_processor(model_dir)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers/hub raise many types for an unusable directory
        raise InputError(model_dir, f"cannot load a CLIP model and processor: {short_error(error)}") from None
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as error:
        raise InputError(None, f"cannot use device {device!r}: {short_error(error)}") from None
    return model, processor


def load_clip_processor(model_dir: str | Path) -> CLIPProcessor:
    """The directory's tokenizer with the PIL CLIP image processor -- always the PIL one, so that the
    embeddings (hence the pointer's proposals) do not depend on whether torchvision is installed."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    image_processor = CLIPImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _looks_like_a_path(model_dir: str | Path) -> bool:
    """A directory rather than a hub name such as openai/clip-vit-base-patch32."""
    text = str(model_dir)
    return isinstance(model_dir, Path) or text.startswith((".", "/", "~")) or text.count("/") != 1


def _check_images_exist(dataset: VQADataset, image_ids: list[int]) -> None:
    for image_id in image_ids:
        path = dataset.image_path_of_image_id(image_id)
        if not path.is_file():
            raise InputError(path, f"image file not found (image_id {image_id}; check the image root)")


@torch.inference_mode()
def _embed_images(model, processor, dataset, image_ids, batch_size, device, workers, progress) -> Tensor:
    def prepare(batch: list[int]) -> Tensor:
        images = [read_rgb_image(dataset.image_path_of_image_id(image_id)) for image_id in batch]
        return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    out = []
    with tqdm(total=len(image_ids), desc="images", unit="img", disable=not progress) as bar:
        for pixel_values in _prefetched(prepare, _batches(image_ids, batch_size), workers, depth=2 * workers):
            features = _features(model.get_image_features(pixel_values=pixel_values.to(device)))
            out.append(features.float().cpu())
            bar.update(pixel_values.shape[0])
    return torch.cat(out)


@torch.inference_mode()
def _embed_texts(model, processor, questions: list[str], batch_size, device, progress) -> Tensor:
    max_length = model.config.text_config.max_position_embeddings
    out = []
    with tqdm(total=len(questions), desc="questions", unit="q", disable=not progress) as bar:
        for batch in _batches(questions, batch_size):
            tokens = processor.tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            features = _features(
                model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            )
            out.append(features.float().cpu())
            bar.update(len(batch))
    return torch.cat(out)


def _features(output) -> Tensor:
    """transformers 5 returns an output object whose pooler_output is the projected embedding."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _batches(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prefetched(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int) -> Iterator[R]:
    """`map(fn, items)` in a thread pool, in order, at most `depth` results ahead of the consumer."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
