"""Generate RL training data for a Lever-LM pointer network (the seed's command, SPEC §2).

    python -m lever_lm.models.v3.generate_rl_data \\
        --sft_ckpt SFT.ckpt --beam_data BEAM.json --output_path RL.json \\
        --query_emb query_embeddings.pt --cand_emb candidate_embeddings.pt [options]

This module only parses flags; the work is `lever_lm.rl.generate.run_generation`.
"""

from __future__ import annotations

import os

# Threads that sleep when idle instead of spinning: on a shared CPU, spinning OpenMP threads make
# the proposal matmuls several times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Cached vision features (long-lived) interleave with the tower's transient activations; expandable
# segments keep the CUDA allocator from stranding memory in half-used blocks. Read when CUDA initialises.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from lever_lm.config import config_section, load_config  # noqa: E402
from lever_lm.data.dataset_paths import add_dataset_arguments, resolve_dataset_paths  # noqa: E402
from lever_lm.errors import exit_on_input_error  # noqa: E402
from lever_lm.models.v3.proposals import ProposalSettings  # noqa: E402
from lever_lm.rl.generate import PROPOSAL_BLOCK, GenerationRequest, run_generation  # noqa: E402
from lever_lm.vqa.backends import available_backends  # noqa: E402
from lever_lm.vqa.metric import MODES  # noqa: E402

DATASET_FIELDS = ("train_ques_path", "train_ann_path", "train_image_root")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lever_lm.models.v3.generate_rl_data",
        description=(
            "For each query in the beam data, propose candidate ICD sequences with the SFT pointer "
            "(beam search, temperature sampling, random), score each with the VQA model on its few-shot "
            "prompt (VQA accuracy), and write the RL data JSON. Resumable: progress is journaled beside "
            "the output and a rerun with the same settings continues where it stopped."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    seed = parser.add_argument_group("the seed's flags")
    seed.add_argument("--sft_ckpt", type=Path, required=True, help="SFT (v2) pointer checkpoint (.ckpt, Lightning layout)")
    seed.add_argument("--beam_data", type=Path, required=True, help="beam data JSON; its keys are the queries, in order")
    seed.add_argument("--output_path", type=Path, required=True, help="final RL data JSON to write")
    seed.add_argument("--query_emb", type=Path, required=True, help="query embeddings .pt, float32 [N, d]")
    seed.add_argument("--cand_emb", type=Path, required=True, help="candidate embeddings .pt, float32 [N, d]")
    seed.add_argument(
        "--vqa_model", default="qwen2.5_vl_3B", help=f"VQA model name; one of: {', '.join(available_backends())}"
    )
    add_dataset_arguments(seed, with_config=False)
    seed.add_argument("--num_beams", type=int, default=5, help="beams in the pointer beam search (0: none)")
    seed.add_argument("--temps", type=float, nargs="+", default=[1.0, 1.3], help="sampling temperatures (> 0)")
    seed.add_argument("--num_samples_per_temp", type=int, default=2, help="samples per temperature")
    seed.add_argument("--num_random", type=int, default=1, help="uniform random sequences per query")
    seed.add_argument("--device", default="cuda:0", help="torch device for the models ('cpu' works)")
    seed.add_argument(
        "--val_ques_path", type=Path, help="official VQA questions JSON whose annotations score the queries"
    )
    seed.add_argument(
        "--val_ann_path",
        type=Path,
        help="official VQA annotations JSON used to score a query when it holds its question id "
        "(else the training annotations are used)",
    )
    seed.add_argument(
        "--config", type=Path, help="YAML config: 'dataset' paths and 'vqa_model' settings (see README)"
    )

    more = parser.add_argument_group("more options")
    more.add_argument("--vqa_model_path", help="local model directory (wins over the config's vqa_model.path)")
    more.add_argument("--shot_num", type=int, help="ICDs per candidate (default: from the beam data)")
    more.add_argument("--num_retrieval", type=int, default=0, help="top-cosine retrieval sequences per query")
    more.add_argument(
        "--exclude_same_image", action="store_true", help="never propose items that share the query's image"
    )
    more.add_argument("--seed", type=int, default=42, help="random seed (per query: seed and query id)")
    more.add_argument("--eval_mode", choices=MODES, default="always", help="VQA accuracy normalisation (SPEC §5)")
    more.add_argument("--batch_size", type=int, help="prompts per VQA generate call (default: from the GPU's free memory, 16 on CPU)")
    more.add_argument("--num_shards", type=int, default=1, help="split the queries into this many shards")
    more.add_argument("--shard_id", type=int, default=0, help=f"which shard to run (blocks of {PROPOSAL_BLOCK} queries)")
    more.add_argument("--merge", action="store_true", help="combine the journals of shards 0..num_shards-1 into --output_path")
    more.add_argument("--limit", type=int, help="only the first N queries of the beam data")
    more.add_argument("--journal_dir", type=Path, help="journal directory (default: <output_path>.journal)")
    more.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    config = load_config(args.config) if args.config else {}
    section = config_section(config, "dataset", args.config)
    flags = {field: getattr(args, field) for field in DATASET_FIELDS}
    dataset = resolve_dataset_paths(args.dataset, flags, config, config_path=args.config)
    val_ques = args.val_ques_path or _path_or_none(section.get("val_ques_path"))
    val_ann = args.val_ann_path or _path_or_none(section.get("val_ann_path"))
    return GenerationRequest(
        sft_ckpt=args.sft_ckpt,
        beam_data=args.beam_data,
        output_path=args.output_path,
        query_emb=args.query_emb,
        cand_emb=args.cand_emb,
        dataset=dataset,
        val_ques_path=val_ques,
        val_ann_path=val_ann,
        vqa_model=args.vqa_model,
        vqa_model_path=args.vqa_model_path,
        config=config,
        proposal=ProposalSettings(
            num_beams=args.num_beams,
            temps=tuple(args.temps),
            num_samples_per_temp=args.num_samples_per_temp,
            num_random=args.num_random,
            num_retrieval=args.num_retrieval,
            exclude_same_image=args.exclude_same_image,
            seed=args.seed,
        ),
        shot_num=args.shot_num,
        eval_mode=args.eval_mode,
        device=args.device,
        batch_size=args.batch_size,
        num_shards=args.num_shards,
        shard_id=args.shard_id,
        limit=args.limit,
        journal_dir=args.journal_dir,
        merge_only=args.merge,
        progress=not args.no_progress,
    )


def _path_or_none(value) -> Path | None:
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with exit_on_input_error():
        run_generation(request_from_args(args))


if __name__ == "__main__":
    main()
