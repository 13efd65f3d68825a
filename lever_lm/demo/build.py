"""Build the embedded default: the demo VQA data set and the tiny models, under one directory.

    python -m lever_lm.demo.build --out data/demo --seed 0

Deterministic: the same seed writes byte-identical files. No network is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from lever_lm.demo.dataset import Split, build_demo_dataset
from lever_lm.demo.tiny_models import build_tiny_clip, build_tiny_openflamingo, build_tiny_qwen2_5_vl

log = logging.getLogger(__name__)

# Prompt words the tiny VLM's vocabulary should hold as whole tokens.
PROMPT_TEXT = [
    "Question: Short answer:",
    "You are a helpful assistant. Answer the question about the image with a short answer.",
]


def build_demo(out: Path, seed: int = 0) -> dict:
    """Write `out/vqa` (data set) and `out/models/{clip-tiny,qwen2.5-vl-tiny,openflamingo-tiny}`; return a summary."""
    vqa_root, models_root = out / "vqa", out / "models"
    for stale in (vqa_root, models_root):
        if stale.exists():
            shutil.rmtree(stale)
    summary = build_demo_dataset(vqa_root, seed=seed)
    corpus = demo_corpus(vqa_root) + PROMPT_TEXT
    build_tiny_clip(models_root / "clip-tiny", corpus, seed=seed)
    build_tiny_qwen2_5_vl(models_root / "qwen2.5-vl-tiny", corpus, seed=seed)
    build_tiny_openflamingo(models_root / "openflamingo-tiny", corpus, seed=seed)
    return summary


def demo_corpus(vqa_root: Path) -> list[str]:
    """Every question and answer of the demo data set, for training the tokenizers."""
    texts = []
    for name in ("train", "val"):
        split = Split(name, vqa_root)
        questions = json.loads(split.questions_path.read_text(encoding="utf-8"))["questions"]
        annotations = json.loads(split.annotations_path.read_text(encoding="utf-8"))["annotations"]
        texts += [q["question"] for q in questions]
        texts += [a["answer"] for ann in annotations for a in ann["answers"]]
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo VQA data set and tiny models (no network).")
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="output directory (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = build_demo(args.out, seed=args.seed)
    log.info("demo written to %s: %s", args.out, summary)


if __name__ == "__main__":
    main()
