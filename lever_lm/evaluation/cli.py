"""The evaluation's command line: flags -> `EvaluationRequest` -> `run_evaluation`.

    python -m lever_lm.evaluation --ckpt POINTER.ckpt --cand_emb candidate_embeddings.pt \\
        --val_query_emb val_query_embeddings.pt --val_ques_path Q --val_ann_path A --val_image_root I \\
        --train_ques_path ... --train_ann_path ... --train_image_root ... --output_dir data/eval [options]

Defaults come from `EvaluationSettings` and `EvaluationRequest`, so they are stated once. A bad
input or setting is one line on stderr and exit status 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from lever_lm.config import load_config
from lever_lm.data.dataset_paths import FIELDS as DATASET_FIELDS
from lever_lm.data.dataset_paths import add_dataset_arguments, resolve_dataset_paths
from lever_lm.errors import exit_on_input_error
from lever_lm.evaluation.icl import EvaluationRequest, EvaluationSettings, run_evaluation
from lever_lm.vqa.backends import available_backends
from lever_lm.vqa.metric import MODES

STAGE = "evaluate"  # the DVC stage (stages/evaluate.py)
# The top-level keys of params.yaml the stage takes, shared with the RL generator (one value serves
# both); dvc.yaml's stage tracks each. The evaluation's own settings and files are the `evaluate`
# section, on the stage's command line.
SHARED_PARAMS = (
    "cand_emb", "dataset", "train_ques_path", "train_ann_path", "train_image_root", "vqa_model", "vqa_model_path",
    "config", "device", "batch_size", "eval_mode",
)  # fmt: skip
SETTINGS = EvaluationSettings()
REQUEST = {f.name: f.default for f in dataclasses.fields(EvaluationRequest)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lever_lm.evaluation",
        description=(
            "In-context VQA accuracy on the validation split for ICDs chosen by the pointer (top beam), "
            "at random, by CLIP retrieval (top cosine), and with no ICDs; each with a bootstrap 95%% interval, "
            "plus paired comparisons of the pointer against random and retrieval. Writes metrics.json, "
            "breakdown.json and results.json into --output_dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--ckpt", type=Path, required=True, help="pointer checkpoint: an SFT .ckpt, or any file the loader reads"
    )
    inputs.add_argument(
        "--cand_emb", type=Path, required=True, help="embeddings of the training split, float32 [N, d]: the ICD pool"
    )
    inputs.add_argument(
        "--val_query_emb", type=Path, required=True, help="embeddings of the validation split, float32 [M, d]"
    )
    inputs.add_argument("--val_ques_path", type=Path, required=True, help="validation questions JSON (official VQA)")
    inputs.add_argument("--val_ann_path", type=Path, required=True, help="validation annotations JSON: score queries")
    inputs.add_argument("--val_image_root", type=Path, required=True, help="directory of the validation images")
    add_dataset_arguments(inputs)
    inputs.add_argument("--output_dir", type=Path, required=True, help="where the three JSON files go")
    choice = parser.add_argument_group("how ICDs are chosen")
    choice.add_argument("--shot_num", type=int, default=SETTINGS.shot_num, help="ICDs per prompt")
    choice.add_argument(
        "--num_beams", type=int, default=SETTINGS.num_beams, help="pointer decoding: beam width (1: greedy)"
    )
    choice.add_argument(
        "--num_random", type=int, default=SETTINGS.num_random, help="random ICD sequences per query (scores averaged)"
    )
    choice.add_argument("--seed", type=int, default=SETTINGS.seed, help="seed of the random ICDs and the bootstrap")
    choice.add_argument(
        "--num_queries", type=int, help="evaluate the first N validation questions only (default, or 0: all)"
    )
    model = parser.add_argument_group("VQA model")
    model.add_argument(
        "--vqa_model", default=REQUEST["vqa_model"], help=f"VQA model name; one of: {', '.join(available_backends())}"
    )
    model.add_argument("--vqa_model_path", help="local model directory (wins over the config's vqa_model.path)")
    model.add_argument("--device", default=REQUEST["device"], help="torch device for the models ('cpu' works)")
    model.add_argument(
        "--batch_size", type=int, help="prompts per VQA generate call (default: from the GPU's free memory; 16 on CPU)"
    )
    model.add_argument("--eval_mode", choices=MODES, default=REQUEST["eval_mode"], help="VQA accuracy normalisation")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def request_from_args(args: argparse.Namespace) -> EvaluationRequest:
    config = load_config(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in DATASET_FIELDS}
    return EvaluationRequest(
        ckpt=args.ckpt,
        cand_emb=args.cand_emb,
        val_query_emb=args.val_query_emb,
        dataset=resolve_dataset_paths(args.dataset, flags, config, config_path=args.config),
        val_ques_path=args.val_ques_path,
        val_ann_path=args.val_ann_path,
        val_image_root=args.val_image_root,
        output_dir=args.output_dir,
        settings=EvaluationSettings(
            shot_num=args.shot_num,
            num_beams=args.num_beams,
            num_random=args.num_random,
            seed=args.seed,
            num_queries=args.num_queries or None,
        ),
        vqa_model=args.vqa_model,
        vqa_model_path=args.vqa_model_path,
        config=config,
        eval_mode=args.eval_mode,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with exit_on_input_error():
        run_evaluation(request_from_args(args))
