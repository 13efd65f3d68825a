"""Export the CLIP embeddings of the training split (docs/formats.md §3.3): query and candidate .pt files.

    python -m lever_lm.models.v3.export_embeddings --clip_model <dir> --output_dir <dir> \
        [--train_ques_path Q --train_ann_path A --train_image_root I | --config C | --dataset okvqa_local]

Writes `<output_dir>/query_embeddings.pt` and `<output_dir>/candidate_embeddings.pt` (identical:
the candidate pool is the training split, and the queries are training items). With the validation
split's three paths (`--val_ques_path --val_ann_path --val_image_root`) it also writes
`<output_dir>/val_query_embeddings.pt`, the evaluation queries' rows (sorted by question_id) in
the same CLIP space; the ICD pool stays the training split. Nothing is written
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
from lever_lm.data.vqa import VQADataset
from lever_lm.embeddings.export import export_embeddings
from lever_lm.errors import InputError, exit_on_input_error

log = logging.getLogger(__name__)

QUERY_FILE = "query_embeddings.pt"
CANDIDATE_FILE = "candidate_embeddings.pt"
VAL_QUERY_FILE = "val_query_embeddings.pt"
VAL_FIELDS = ("val_ques_path", "val_ann_path", "val_image_root")


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
    parser.add_argument("--output_dir", type=Path, required=True, help="directory for the .pt files")
    val = parser.add_argument_group("validation split (the evaluation's queries; all three or none)")
    val.add_argument("--val_ques_path", type=Path, help="official VQA questions JSON of the validation split")
    val.add_argument("--val_ann_path", type=Path, help="official VQA annotations JSON of the validation split")
    val.add_argument("--val_image_root", type=Path, help="directory of the validation split's images")
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
        given = [f"--{name}" for name in VAL_FIELDS if getattr(args, name) is not None]
        if 0 < len(given) < len(VAL_FIELDS):
            raise InputError(None, f"the validation split needs all of --{', --'.join(VAL_FIELDS)}; got {given}")
        paths = dataset_paths_from_args(args)
        dataset = paths.load()
        val = VQADataset.load(args.val_ques_path, args.val_ann_path, args.val_image_root) if given else None
        settings = dict(
            batch_size=args.batch_size, device=args.device, progress=not args.no_progress, num_workers=args.num_workers
        )
        log.info("embedding %d items of %s on %s", len(dataset), paths.train_ques_path, args.device)
        embeddings = export_embeddings(dataset, args.clip_model, **settings)
        val_embeddings = None
        if val is not None:
            log.info("embedding %d validation items of %s", len(val), args.val_ques_path)
            val_embeddings = export_embeddings(val, args.clip_model, **settings)
        for name in (QUERY_FILE, CANDIDATE_FILE):
            save_embeddings(embeddings, args.output_dir / name)
        log.info("wrote %s and %s: %s", QUERY_FILE, CANDIDATE_FILE, list(embeddings.shape))
        if val_embeddings is not None:
            save_embeddings(val_embeddings, args.output_dir / VAL_QUERY_FILE)
            log.info("wrote %s: %s", VAL_QUERY_FILE, list(val_embeddings.shape))


if __name__ == "__main__":
    main()
