"""Candidates scored per second by the Ray engine with 2 workers against 1, on the demo (CPU).

    .venv/bin/python benchmarks/bench_ray_engine.py                   # builds the demo in a temp dir
    .venv/bin/python benchmarks/bench_ray_engine.py --queries 32 --repeats 1

The whole generator runs, as `--engine ray --num_workers N` would from the command line: a new
local Ray per run, the demo's tiny Qwen2.5-VL, the full default proposal set (5 beams, 2 x 2
samples, 1 random) for `--queries` beam-data queries in blocks of `--block`. Every worker has one
CPU and one torch thread. Each run starts from an empty journal.

Two figures per run, from the meta sidecar: the scoring speed (candidates / seconds from the first
worker ready to the end; loading a worker is a fixed cost per run) and the end-to-end time (Ray
start, worker start, scoring, final JSON). The configurations take turns for `--repeats` rounds and
the medians count. Each round also measures the machine's own ceiling: how much more two
independent one-thread processes get done than one (on a shared or hyperthreaded machine, less
than 2x; no engine can scale past it). The local engine (this process, one thread) runs once per round for reference
(end to end only: it has no separate scoring phase). Every run must write the same bytes.
"""

# ruff: noqa: E402 -- the process settings are applied before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lever_lm.data.beam_data import load_beam_data, save_beam_data
from lever_lm.data.embeddings import save_embeddings
from lever_lm.data.vqa import VQADataset
from lever_lm.demo.build import build_demo
from lever_lm.embeddings.export import export_embeddings
from lever_lm.models.v2.checkpoint import save_pointer_checkpoint
from lever_lm.models.v2.train_sft import train_pointer_sft
from lever_lm.models.v3.samplers import draw_queries, sample_pools
from lever_lm.rl.cli import build_parser, request_from_args
from lever_lm.rl.generate import run_generation


def build_inputs(demo: Path, out: Path, queries: int) -> list[str]:
    """The demo's embeddings, beam data for `queries` queries and a briefly trained SFT pointer;
    returns the generator's input flags."""
    vqa = demo / "vqa"
    paths = {
        "--train_ques_path": vqa / "OpenEnded_mscoco_train2014_questions.json",
        "--train_ann_path": vqa / "mscoco_train2014_annotations.json",
        "--train_image_root": vqa / "mscoco2014" / "train2014",
    }
    dataset = VQADataset.load(*paths.values())
    embeddings = export_embeddings(dataset, demo / "models" / "clip-tiny", batch_size=64, progress=False)
    save_embeddings(embeddings, out / "embeddings.pt")
    save_beam_data(random_beam_data(dataset.image_ids, queries), out / "beam.json")
    beam = load_beam_data(out / "beam.json", len(dataset))
    model = train_pointer_sft(
        beam, embeddings, hidden_dim=32, num_layers=1, use_gate=True, epochs=5, lr=3e-3, batch_size=32, seed=0
    )
    save_pointer_checkpoint(model, out / "sft.ckpt")
    flags = [f"{flag}={path}" for flag, path in paths.items()]
    return flags + [
        f"--sft_ckpt={out / 'sft.ckpt'}",
        f"--beam_data={out / 'beam.json'}",
        f"--query_emb={out / 'embeddings.pt'}",
        f"--cand_emb={out / 'embeddings.pt'}",
        f"--vqa_model_path={demo / 'models' / 'qwen2.5-vl-tiny'}",
        "--device=cpu",
        "--no_progress",
    ]


def random_beam_data(image_ids: list[int], num_queries: int, seed: int = 0) -> dict:
    """Beam data with one sequence per query, two rows of its random pool: the generator reads only the
    queries and the shot number (these benchmarks time scoring; InfoScore beam data would take minutes)."""
    queries = draw_queries(len(image_ids), num_queries, seed)
    pools = sample_pools("rand", queries, image_ids, pool_size=2, seed=seed)
    return {str(q): {"id_list": [[*pools[q], q]], "score_list": [0.0]} for q in queries}


CEILING_PROBE = """
import time, torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
started = time.perf_counter()
for _ in range(2000):
    a @ a
print(time.perf_counter() - started)
"""


def machine_ceiling() -> float:
    """Throughput of two concurrent one-thread matmul processes relative to one process alone."""

    def seconds(copies: int) -> float:
        probes = [subprocess.Popen([sys.executable, "-c", CEILING_PROBE], stdout=subprocess.PIPE, text=True)]
        probes += [subprocess.Popen([sys.executable, "-c", CEILING_PROBE], stdout=subprocess.PIPE, text=True)
                   for _ in range(copies - 1)]  # fmt: skip
        return max(float(p.communicate()[0]) for p in probes)

    alone = seconds(1)
    return 2 * alone / seconds(2)


def generate(flags: list[str], output: Path, block: int) -> tuple[float | None, float, int, bytes]:
    """One run from an empty journal: (scoring seconds (Ray only), end-to-end seconds, candidates, output)."""
    args = build_parser().parse_args([*flags, f"--output_path={output}", f"--proposal_block={block}"])
    started = time.perf_counter()
    summary = run_generation(request_from_args(args))
    seconds = time.perf_counter() - started
    scoring = summary.engine["scoring_seconds"] if summary.engine else None
    return scoring, seconds, summary.candidates_processed, output.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, help="an already built demo (default: build one in a temp dir)")
    parser.add_argument("--queries", type=int, default=256, help="beam-data queries (the demo has 274 items)")
    parser.add_argument("--block", type=int, default=8, help="--proposal_block: the unit handed to a worker")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the medians count")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver and the local reference: one thread, like each worker
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo_dir or Path(tmp) / "demo"
        if args.demo_dir is None:
            build_demo(demo, seed=0)
        (Path(tmp) / "inputs").mkdir()
        flags = build_inputs(demo, Path(tmp) / "inputs", args.queries)
        run(flags, Path(tmp), args)


def run(flags: list[str], tmp: Path, args) -> None:
    ways = {
        "local engine (1 thread)": [],
        "ray, 1 worker": ["--engine=ray", "--num_workers=1"],
        "ray, 2 workers": ["--engine=ray", "--num_workers=2"],
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, python {platform.python_version()}; 1 torch thread per worker"
    )
    print(f"workload: {args.queries} queries of the demo, blocks of {args.block}, default proposals, tiny Qwen2.5-VL")
    rounds: dict[str, list[tuple[float, float, int]]] = {label: [] for label in ways}
    outputs = set()
    ceilings = []
    for r in range(args.repeats):
        ceilings.append(machine_ceiling())
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"round {r + 1}: load average {load}; machine ceiling for 2 processes {ceilings[-1]:.2f}x", flush=True)
        for number, (label, extra) in enumerate(ways.items()):
            output = tmp / f"run-{r}-{number}" / "rl.json"
            scoring, seconds, candidates, data = generate([*flags, *extra], output, args.block)
            rounds[label].append((scoring, seconds, candidates))
            outputs.add(data)
            print(f"  {describe(label, scoring and candidates / scoring, seconds)}", flush=True)
    print("medians:")
    speed, wall = {}, {}
    for label, runs in rounds.items():
        wall[label] = statistics.median(t for _, t, _ in runs)
        speed[label] = statistics.median(c / s for s, _, c in runs) if runs[0][0] is not None else None
        print(f"  {describe(label, speed[label], wall[label])}")
    print(f"  machine ceiling for 2 processes: {statistics.median(ceilings):.2f}x")
    print(f"identical output in every run: {len(outputs) == 1}")
    print(f"speed-up, 2 workers vs 1 (scoring): {speed['ray, 2 workers'] / speed['ray, 1 worker']:.2f}x")
    print(f"speed-up, 2 workers vs 1 (end to end): {wall['ray, 1 worker'] / wall['ray, 2 workers']:.2f}x")
    if len(outputs) != 1:
        raise SystemExit("the runs wrote different outputs")


def describe(label: str, speed: float | None, seconds: float) -> str:
    """One result line: scoring speed (candidates per second; Ray only) and end-to-end seconds."""
    scoring = f"{speed:7.1f} cand/s" if speed is not None else "      -       "
    return f"{label:24s} scoring {scoring}, end to end {seconds:6.1f} s"


if __name__ == "__main__":
    main()
