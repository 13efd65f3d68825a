"""A brief, deterministic contrastive training of the demo's tiny CLIP, so that its embeddings see the pictures.

The pointer network reads CLIP embeddings (picture and question) to tell which demonstrations
help a query. The demo VLM is helped by a demonstration that shares the query's answer, and the
answer is in the picture: its colour, shape, count or side. With random weights the tiny CLIP
keeps too little of that (a linear probe on its image embeddings of the demo training pictures
finds the shape and the count about half the time): a pointer trained on InfoScore beam data over
those embeddings proposed ICDs no better than random ones. A real CLIP carries such content
because it was trained on pictures with captions. The demo CLIP gets the same training at toy
scale: CLIP's own contrastive loss (`CLIPModel(..., return_loss=True)`)
on every picture the demo can draw -- each scene of `dataset.SHAPES` x colours x counts x sides
on each background, rendered by `dataset.render_scene` and stored as JPEG as the data set's
pictures are -- paired with a caption of what it shows ("two red circles on the left"). It never
sees a question or an answer. Each step shows every caption once, each with one of its pictures
(a random background), so no two pictures of a batch share a caption.

After training the same probe finds colour, shape and side nearly always and the count most of
the time, and a pointer trained on InfoScore beam data picks demonstrations that share the
query's answer (docs/demo.md).

Cost: about 15 s on one CPU thread. Determinism: the seed fixes every draw; training runs with a
fixed thread count and deterministic kernels (`train_vlm.deterministic_torch`), so the same seed
on the same machine gives bit-identical weights.

    python -m lever_lm.demo.train_clip --base_model data/demo/models/clip-tiny --out data/demo/models/clip-demo
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from lever_lm.demo.dataset import BACKGROUNDS, COLOURS, NUMBER_WORDS, SHAPES, Scene, render_scene
from lever_lm.demo.train_vlm import deterministic_torch, save_trained_model
from lever_lm.errors import InputError, exit_on_input_error

log = logging.getLogger(__name__)

SIDES = ("left", "right")


@dataclass(frozen=True)
class ClipTrainSettings:
    """Everything besides the base model that shapes the trained weights."""

    steps: int = 300
    lr: float = 1e-3
    seed: int = 0
    num_threads: int = 1


@dataclass(frozen=True)
class ClipTrainSummary:
    out_dir: Path
    losses: list[float]  # per step
    seconds: float


def caption(scene: Scene) -> str:
    """What the picture shows, in words: "one blue square on the right", "three red circles on the left"."""
    noun = scene.shape if scene.count == 1 else scene.shape + "s"
    return f"{NUMBER_WORDS[scene.count]} {scene.colour} {noun} on the {scene.side}"


def all_scenes() -> list[list[Scene]]:
    """Every scene the demo can draw, grouped by caption (the backgrounds of one caption together)."""
    return [
        [Scene(0, shape, colour, count, side, background) for background in sorted(BACKGROUNDS)]
        for shape in SHAPES
        for colour in sorted(COLOURS)
        for count in sorted(NUMBER_WORDS)
        for side in SIDES
    ]


def as_stored(image: Image.Image) -> Image.Image:
    """The picture after a round trip through JPEG, as the data set stores its pictures."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def train_demo_clip(
    base_model_dir: str | Path, out_dir: str | Path, settings: ClipTrainSettings = ClipTrainSettings()
) -> ClipTrainSummary:
    """Train the base CLIP contrastively on captioned demo pictures (see the module doc); save it to `out_dir`."""
    from lever_lm.embeddings.export import load_clip

    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    if settings.steps < 1 or settings.num_threads < 1 or not settings.lr > 0:
        raise InputError(None, f"steps and num_threads must be positive integers and lr positive, got {settings}")
    start = time.perf_counter()
    with deterministic_torch(settings.num_threads):
        model, processor = load_clip(base_model_dir, "cpu")
        groups = all_scenes()
        texts = processor.tokenizer([caption(group[0]) for group in groups], padding=True, return_tensors="pt")
        pictures = [as_stored(render_scene(scene)) for group in groups for scene in group]
        pixels = processor.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
        pixels = pixels.view(len(groups), len(groups[0]), *pixels.shape[1:])  # [caption, background, C, H, W]
        losses = contrastive_training(model, texts, pixels, settings)
        log.info("CLIP training: %d steps, loss %.3f -> %.3f", settings.steps, losses[0], losses[-1])
        model.eval()
        save_trained_model(model, base_model_dir, out_dir, settings)
    return ClipTrainSummary(out_dir=out_dir, losses=losses, seconds=time.perf_counter() - start)


def contrastive_training(model, texts: dict, pixels: Tensor, settings: ClipTrainSettings) -> list[float]:
    """CLIP's loss over every caption per step, each caption with a picture of a random background."""
    rng = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    model.train()
    rows = torch.arange(pixels.shape[0])
    losses = []
    for _ in range(settings.steps):
        backgrounds = torch.randint(pixels.shape[1], (pixels.shape[0],), generator=rng)
        output = model(
            input_ids=texts["input_ids"],
            attention_mask=texts["attention_mask"],
            pixel_values=pixels[rows, backgrounds],
            return_loss=True,
        )
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    return losses


def main(argv: list[str] | None = None) -> None:
    defaults = ClipTrainSettings()
    parser = argparse.ArgumentParser(description="Train the demo's tiny CLIP on captioned demo pictures (contrastive).")
    parser.add_argument("--base_model", type=Path, required=True, help="the tiny CLIP directory to start from")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the trained model to")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"training steps (default: {defaults.steps})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"AdamW learning rate (default: {defaults.lr})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"(default: {defaults.seed})")
    parser.add_argument(
        "--num_threads", type=int, default=defaults.num_threads, help=f"torch threads (default: {defaults.num_threads})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_input_error():
        settings = ClipTrainSettings(steps=args.steps, lr=args.lr, seed=args.seed, num_threads=args.num_threads)
        summary = train_demo_clip(args.base_model, args.out, settings)
    log.info("trained in %.1f s; written to %s", summary.seconds, summary.out_dir)


if __name__ == "__main__":
    main()
