"""Export the CLIP embeddings of the training split (docs/formats.md §3.3): query and candidate .pt files.

    python -m lever_lm.models.v3.export_embeddings --clip_model <dir> --output_dir <dir> \
        [--train_ques_path Q --train_ann_path A --train_image_root I | --config C | --dataset okvqa_local]

Writes `<output_dir>/query_embeddings.pt` and `<output_dir>/candidate_embeddings.pt` (identical:
the candidate pool is the training split, and the queries are training items). Nothing is written
until every row is computed, and each file is written atomically. Bad input (missing file or image,
unreadable model directory) prints `error: <path>: <problem>` and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import transformers

from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
from lever_lm.data.embeddings import save_embeddings
from lever_lm.embeddings.export import export_embeddings
from lever_lm.errors import exit_on_input_error

log = logging.getLogger(__name__)

QUERY_FILE = "query_embeddings.pt"
CANDIDATE_FILE = "candidate_embeddings.pt"


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="CLIP image+question embeddings of the training split -> query_embeddings.pt, "
        "candidate_embeddings.pt (float32 [N, d], row i = item i sorted by question_id)."
    )
    add_dataset_arguments(parser)
    parser.add_argument(
        "--clip_model", required=True, help="CLIP model directory (or a model name already in the local HF cache)"
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="directory for the two .pt files")
    parser.add_argument("--batch_size", type=int, default=64, help="images / questions per model call (default: 64)")
    parser.add_argument(
        "--device", default=default_device(), help="torch device (default: cuda:0 if available, else cpu)"
    )
    parser.add_argument("--num_workers", type=int, default=None, help="image decoding threads (default: min(8, CPUs))")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()
    with exit_on_input_error():
        paths = dataset_paths_from_args(args)
        dataset = paths.load()
        log.info("embedding %d items of %s on %s", len(dataset), paths.train_ques_path, args.device)
        embeddings = export_embeddings(
            dataset,
            args.clip_model,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
            num_workers=args.num_workers,
        )
        for name in (QUERY_FILE, CANDIDATE_FILE):
            save_embeddings(embeddings, args.output_dir / name)
        log.info("wrote %s and %s: %s", QUERY_FILE, CANDIDATE_FILE, list(embeddings.shape))


if __name__ == "__main__":
    main()
