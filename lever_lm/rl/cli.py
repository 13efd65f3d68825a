"""The generator's command line (the seed's command; docs/formats.md §2): flags -> `GenerationRequest`.

    python -m lever_lm.models.v3.generate_rl_data \\
        --sft_ckpt SFT.ckpt --beam_data BEAM.json --output_path RL.json \\
        --query_emb query_embeddings.pt --cand_emb candidate_embeddings.pt [options]

Defaults come from `GenerationRequest` and `ProposalSettings`, so they are stated once. Every
way a run can stop is one line on stderr and a non-zero exit, never a traceback: a bad input
(exit 2), a full disk or unwritable output (exit 2; the journal keeps every finished query),
Ctrl-C (130) or SIGTERM (143), both saying how far the journal got and that a rerun resumes, and
a failure of the machine -- an accelerator error, whole batches failing -- (3).
"""

# ruff: noqa: E402 -- `python -m lever_lm.rl.cli` applies the process settings before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import contextlib
import dataclasses
import errno
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from lever_lm.config import config_section, load_config
from lever_lm.data.dataset_paths import FIELDS as DATASET_FIELDS
from lever_lm.data.dataset_paths import add_dataset_arguments, resolve_dataset_paths
from lever_lm.errors import EXIT_INPUT_ERROR, exit_on_input_error
from lever_lm.models.v3.pools import POOL_MODES, SAMPLERS, PoolSettings
from lever_lm.models.v3.proposals import ProposalSettings
from lever_lm.rl.generate import run_generation
from lever_lm.rl.request import ENGINES, PROPOSAL_BLOCK, GenerationRequest
from lever_lm.vqa.backends import available_backends
from lever_lm.vqa.backends.base import GenerationAborted
from lever_lm.vqa.metric import MODES

log = logging.getLogger(__name__)

REQUEST = {f.name: f.default for f in dataclasses.fields(GenerationRequest)}
PROPOSAL = ProposalSettings()
POOLS = PoolSettings()
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
EXIT_ABORTED = 3  # the machine failed (an accelerator error, whole batches failing): fix it, then rerun


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
    seed.add_argument(
        "--sft_ckpt",
        type=Path,
        required=True,
        help="pointer checkpoint: an SFT .ckpt (Lightning layout) or a Lever-Plus RL .pt (model_state_dict)",
    )
    seed.add_argument(
        "--beam_data", type=Path, required=True, help="beam data JSON; its keys are the queries, in order"
    )
    seed.add_argument("--output_path", type=Path, required=True, help="final RL data JSON to write")
    seed.add_argument("--query_emb", type=Path, required=True, help="query embeddings .pt, float32 [N, d]")
    seed.add_argument("--cand_emb", type=Path, required=True, help="candidate embeddings .pt, float32 [N, d]")
    seed.add_argument(
        "--vqa_model", default=REQUEST["vqa_model"], help=f"VQA model name; one of: {', '.join(available_backends())}"
    )
    add_dataset_arguments(seed, with_config=False)
    seed.add_argument(
        "--num_beams", type=int, default=PROPOSAL.num_beams, help="beams in the pointer beam search (0: none)"
    )
    seed.add_argument(
        "--temps",
        type=float,
        nargs="*",
        default=list(PROPOSAL.temps),
        help="sampling temperatures (> 0; none: no sampling)",
    )
    seed.add_argument(
        "--num_samples_per_temp", type=int, default=PROPOSAL.num_samples_per_temp, help="samples per temperature"
    )
    seed.add_argument("--num_random", type=int, default=PROPOSAL.num_random, help="uniform random sequences per query")
    seed.add_argument("--device", default=REQUEST["device"], help="torch device for the models ('cpu' works)")
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
        "--config", type=Path, help="YAML config: 'dataset' paths and 'vqa_model' settings (see docs/generator.md)"
    )
    _add_more_options(parser.add_argument_group("more options"))
    return parser


def _add_more_options(more: argparse._ArgumentGroup) -> None:
    more.add_argument("--vqa_model_path", help="local model directory (wins over the config's vqa_model.path)")
    more.add_argument("--shot_num", type=int, help="ICDs per candidate (default: from the beam data)")
    more.add_argument(
        "--num_retrieval", type=int, default=PROPOSAL.num_retrieval, help="top-cosine retrieval sequences per query"
    )
    more.add_argument(
        "--exclude_same_image", action="store_true", help="never propose items that share the query's image"
    )
    more.add_argument("--seed", type=int, default=PROPOSAL.seed, help="random seed (per query: seed and query id)")
    more.add_argument(
        "--pool",
        choices=POOL_MODES,
        default=POOLS.pool,
        help="candidate pool: every training item (global), or each query's own pool (per_query, the lineage's k64 "
        "layout: pointers are positions in the pool, records carry candidate_pool_ids and pointer_global)",
    )
    more.add_argument("--pool_size", type=int, default=POOLS.pool_size, help="items per per-query pool")
    more.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="where per-query pools come from: cache (--sampler_cache), rand (uniform, seeded per query), sim (nearest "
        "by embedding cosine); unset: cache when --sampler_cache is given, else rand",
    )
    more.add_argument(
        "--sampler_cache", type=Path, help="the lineage's sampler cache JSON: {str(query row): [pool rows]}"
    )
    more.add_argument("--eval_mode", choices=MODES, default=REQUEST["eval_mode"], help="VQA accuracy normalisation")
    gt_prob = more.add_mutually_exclusive_group()
    gt_prob.add_argument(
        "--gt_prob",
        action="store_true",
        default=REQUEST["gt_prob"],
        help="compute vqa_gt_prob, the model's expected accuracy over the human answers",
    )
    gt_prob.add_argument(
        "--no_gt_prob",
        dest="gt_prob",
        action="store_false",
        help="switch vqa_gt_prob off: the field is null (gt_prob: %(default)s)",
    )
    more.add_argument(
        "--proposal_block",
        type=int,
        default=PROPOSAL_BLOCK,
        help="queries proposed together; the unit of sharding (part of the journal fingerprint)",
    )
    add_run_options(more)


def add_run_options(more: argparse._ArgumentGroup) -> None:
    """The flags of every per-query job (`request.JobOptions`): batch size, shards, limit, journal,
    engine, progress."""
    more.add_argument(
        "--batch_size", type=int, help="prompts per VQA model call (default: from the GPU's free memory; 16 on CPU)"
    )
    more.add_argument(
        "--num_shards", type=int, default=REQUEST["num_shards"], help="split the queries into this many shards"
    )
    more.add_argument(
        "--shard_id", type=int, default=REQUEST["shard_id"], help="which shard to run (whole blocks of queries)"
    )
    more.add_argument(
        "--merge", action="store_true", help="combine the journals of shards 0..num_shards-1 into --output_path"
    )
    more.add_argument("--limit", type=int, help="only the first N queries")
    more.add_argument("--journal_dir", type=Path, help="journal directory (default: <output_path>.journal)")
    more.add_argument(
        "--engine",
        choices=ENGINES,
        default=REQUEST["engine"],
        help="local: this process; ray: Ray actors on many GPUs and machines (pip install '.[ray]')",
    )
    more.add_argument(
        "--ray_address",
        help="with --engine ray: none starts Ray on this machine; auto, HOST:PORT or ray://HOST:PORT joins a cluster",
    )
    more.add_argument(
        "--num_workers", type=int, help="with --engine ray: workers (default: every GPU of the cluster on CUDA, else 1)"
    )
    more.add_argument(
        "--gpus_per_worker",
        type=float,
        help="with --engine ray: GPUs per worker; a fraction packs small models (default: 1 on CUDA, 0 on CPU)",
    )
    more.add_argument("--no_progress", action="store_true", help="no progress bar")


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    config = load_config(args.config) if args.config else {}
    section = config_section(config, "dataset", args.config)
    flags = {name: getattr(args, name) for name in DATASET_FIELDS}
    dataset = resolve_dataset_paths(args.dataset, flags, config, config_path=args.config)
    return GenerationRequest(
        sft_ckpt=args.sft_ckpt,
        beam_data=args.beam_data,
        output_path=args.output_path,
        query_emb=args.query_emb,
        cand_emb=args.cand_emb,
        dataset=dataset,
        val_ques_path=args.val_ques_path or _path_or_none(section.get("val_ques_path")),
        val_ann_path=args.val_ann_path or _path_or_none(section.get("val_ann_path")),
        vqa_model=args.vqa_model,
        vqa_model_path=args.vqa_model_path,
        config=config,
        config_path=args.config,
        proposal=ProposalSettings(
            num_beams=args.num_beams,
            temps=tuple(args.temps),
            num_samples_per_temp=args.num_samples_per_temp if args.temps else 0,
            num_random=args.num_random,
            num_retrieval=args.num_retrieval,
            exclude_same_image=args.exclude_same_image,
            seed=args.seed,
        ),
        pools=PoolSettings(args.pool, args.pool_size, args.sampler, args.sampler_cache),
        shot_num=args.shot_num,
        proposal_block=args.proposal_block,
        eval_mode=args.eval_mode,
        gt_prob=args.gt_prob,
        device=args.device,
        **run_fields(args),
    )


def run_fields(args: argparse.Namespace) -> dict:
    """The `JobOptions` fields that `add_run_options` parsed."""
    return {
        "batch_size": args.batch_size,
        "num_shards": args.num_shards,
        "shard_id": args.shard_id,
        "limit": args.limit,
        "journal_dir": args.journal_dir,
        "merge_only": args.merge,
        "progress": not args.no_progress,
        "engine": args.engine,
        "ray_address": args.ray_address,
        "num_workers": args.num_workers,
        "gpus_per_worker": args.gpus_per_worker,
    }


def _path_or_none(value) -> Path | None:
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    with exit_on_input_error(), one_line_stops(args):
        run_generation(request_from_args(args))


@contextlib.contextmanager
def one_line_stops(args: argparse.Namespace) -> Iterator[None]:
    """Ctrl-C, SIGTERM and a full or read-only disk end the run with one line, never a traceback."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except GenerationAborted as error:
        print(f"error: stopped: {error}; {_progress_note(args)}; a rerun resumes", file=sys.stderr)
        raise SystemExit(EXIT_ABORTED) from None
    except KeyboardInterrupt as interrupt:
        signum = interrupt.args[0] if interrupt.args else signal.SIGINT
        print(f"\ninterrupted: {_progress_note(args)}; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED.get(signum, 130)) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            raise
        where = error.filename or args.output_path
        print(f"error: {where}: {error.strerror}; {_progress_note(args)}; fix it and rerun", file=sys.stderr)
        raise SystemExit(EXIT_INPUT_ERROR) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signum)


def _progress_note(args: argparse.Namespace) -> str:
    """How many queries the journals hold, read without trusting them (for a last message)."""
    root = args.journal_dir or args.output_path.with_name(args.output_path.name + ".journal")
    counts = []
    for path in sorted(root.glob(f"*/shard-{args.shard_id}-of-{args.num_shards}.jsonl")) if root.is_dir() else []:
        with contextlib.suppress(OSError):
            counts.append((path.stat().st_mtime, path, max(path.read_bytes().count(b"\n") - 1, 0)))
    if not counts:
        return "nothing was journaled yet"
    _, path, lines = max(counts)
    return f"{lines} queries are journaled in {path} and kept"


if __name__ == "__main__":
    main()
