"""The beam data command line (stage `beam_data`): flags -> `BeamDataRequest` -> `run_beam_data`.

    python -m lever_lm.infoscore.cli --sampler_cache pools.json --output_path beam_data.json \\
        --vqa_model qwen2.5_vl_3B [--vqa_model_path DIR] [--train_* paths | --config C | --dataset D] \\
        [--shot_num 2 --beam_size 5 --ranking sum --construct_order right] [--device cuda:0] [...]

Defaults come from `SearchSettings` and `JobOptions`, so they are stated once. The run options
(batch size, shards, --merge, --limit, journal, engine, Ray) are the RL generator's, and so are the
ways a run stops: one line on stderr and a non-zero exit, never a traceback, and a rerun of the
same command resumes from the journal.
"""

# ruff: noqa: E402 -- `python -m lever_lm.infoscore.cli` applies the process settings before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import dataclasses
import logging
from pathlib import Path

from lever_lm.config import load_config
from lever_lm.data.dataset_paths import FIELDS as DATASET_FIELDS
from lever_lm.data.dataset_paths import add_dataset_arguments, resolve_dataset_paths
from lever_lm.errors import exit_on_input_error
from lever_lm.infoscore.generate import BeamDataRequest, run_beam_data
from lever_lm.infoscore.search import CONSTRUCT_ORDERS, RANKINGS, SearchSettings
from lever_lm.rl.cli import add_run_options, one_line_stops, run_fields
from lever_lm.rl.request import JobOptions
from lever_lm.vqa.backends import available_backends

OPTIONS = {f.name: f.default for f in dataclasses.fields(JobOptions)}
SEARCH = SearchSettings()
STAGE = "beam_data"  # the DVC stage (stages/beam_data.py)
# The top-level keys of params.yaml the stage takes, shared with the RL generator (one value serves
# both); dvc.yaml's stage tracks each. The search's settings are the `infoscore` section, the files
# the stage's command line; shards, --merge, --limit and --journal_dir are for runs by hand.
SHARED_PARAMS = (
    "dataset", "train_ques_path", "train_ann_path", "train_image_root", "vqa_model", "vqa_model_path", "config",
    "device", "batch_size", "engine", "ray_address", "num_workers", "gpus_per_worker",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lever_lm.infoscore.cli",
        description=(
            "Beam data by InfoScore (the lineage's generate_data.py): for each query of the sampler cache, a beam "
            "search over its pool for the ICD sequences that raise the VQA model's probability of the query's answer "
            "most, written as the lineage's beam JSON. Resumable: progress is journaled beside the output and a rerun "
            "with the same settings continues where it stopped."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    main = parser.add_argument_group("inputs and output")
    main.add_argument(
        "--sampler_cache", type=Path, required=True, help="the queries' pools, {str(query row): [pool rows]}"
    )
    main.add_argument("--output_path", type=Path, required=True, help="beam data JSON to write")
    main.add_argument(
        "--vqa_model", default=OPTIONS["vqa_model"], help=f"VQA model name; one of: {', '.join(available_backends())}"
    )
    main.add_argument("--vqa_model_path", help="local model directory (wins over the config's vqa_model.path)")
    add_dataset_arguments(main)
    main.add_argument("--device", default=OPTIONS["device"], help="torch device for the VQA model ('cpu' works)")
    search = parser.add_argument_group("the search")
    search.add_argument("--shot_num", type=int, default=SEARCH.shot_num, help="ICDs per sequence")
    search.add_argument("--beam_size", type=int, default=SEARCH.beam_size, help="sequences kept per step and query")
    search.add_argument(
        "--ranking",
        choices=RANKINGS,
        default=SEARCH.ranking,
        help="rank expansions by the summed InfoScore of their steps (sum) or by the last step's (last, the lineage's)",
    )
    search.add_argument(
        "--construct_order",
        choices=CONSTRUCT_ORDERS,
        default=SEARCH.construct_order,
        help="where a new ICD goes: right before the query (right) or first in the prompt (left, the lineage's)",
    )
    add_run_options(parser.add_argument_group("run options"))
    return parser


def request_from_args(args: argparse.Namespace) -> BeamDataRequest:
    config = load_config(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in DATASET_FIELDS}
    return BeamDataRequest(
        sampler_cache=args.sampler_cache,
        output_path=args.output_path,
        dataset=resolve_dataset_paths(args.dataset, flags, config, config_path=args.config),
        search=SearchSettings(args.shot_num, args.beam_size, args.ranking, args.construct_order),
        vqa_model=args.vqa_model,
        vqa_model_path=args.vqa_model_path,
        config=config,
        config_path=args.config,
        device=args.device,
        **run_fields(args),
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with exit_on_input_error(), one_line_stops(args):
        run_beam_data(request_from_args(args))


if __name__ == "__main__":
    main()
