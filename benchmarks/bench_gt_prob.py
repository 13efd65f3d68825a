"""The cost of the answer likelihoods (`vqa_gt_prob`): generation + likelihood vs generation alone, tiny Qwen2.5-VL.

    .venv/bin/python benchmarks/bench_gt_prob.py                      # builds the demo in a temp dir
    .venv/bin/python benchmarks/bench_gt_prob.py --backend hf_image_text_to_text

The workload is `bench_vqa_scoring.py`'s: `--queries` training queries with `--candidates` 2-shot
candidates each, 3 beams and 5 new tokens, `--batch-size` candidates per generate call. With the
likelihoods on, every candidate also scores its query's distinct human answers (the replies the
generator passes, `expected_accuracy.distinct_answers`); queries are drawn among those with at
least `--min-answers` distinct answers, so each candidate scores about 3-6 of them.

Both ways run on the same backend, in this process, taking turns for `--repeats` rounds, each with
a cold image cache (as a real run meets each query's images). Each round gives the ratio of its
two times; the median ratio is the result. Both the wall-clock time and the process's CPU time are
measured: with one torch thread the CPU time is the work done, and it stays put when other jobs
share the machine, while the wall-clock time then swings by 2x between rounds. The answers of both
ways must be identical: scoring replies never changes an answer.
"""

# ruff: noqa: E402 -- the process settings are applied before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import math
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_vqa_scoring import candidates, split_items

from lever_lm.demo.build import build_demo
from lever_lm.demo.dataset import Split
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.expected_accuracy import distinct_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, help="an already built demo (default: build one in a temp dir)")
    parser.add_argument("--backend", default="qwen2.5_vl_3B", choices=("qwen2.5_vl_3B", "hf_image_text_to_text"))
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=10, help="candidates per query")
    parser.add_argument(
        "--min-answers", type=int, default=3, help="draw queries with at least this many distinct answers"
    )
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median ratio counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo_dir or Path(tmp)
        if args.demo_dir is None:
            build_demo(demo, seed=0)
        run(demo, args)


def run(demo: Path, args) -> None:
    train = split_items(Split("train", demo / "vqa"))
    eligible = [i for i, item in enumerate(train) if len(distinct_answers(item["answers"])) >= args.min_answers]
    rows = [train[i] for i in eligible]
    work = candidates(rows, args.queries, args.candidates, args.shots, args.seed)
    prompts = [prompt for _, prompt in work]
    replies = [distinct_answers(rows[query]["answers"]) for query, _ in work]
    backend = load_backend(
        args.backend, model_path=str(demo / "models" / "qwen2.5-vl-tiny"), batch_size=args.batch_size
    )
    warmup = random.Random(args.seed).sample(range(len(prompts)), 4)
    backend.generate([prompts[i] for i in warmup], [replies[i] for i in warmup])

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    print(f"workload: {args.backend}, {args.queries} queries x {args.candidates} candidates = {len(work)} "
          f"candidates, {args.shots} shots, {sum(map(len, replies)) / len(replies):.1f} distinct answers per "
          f"candidate (min {min(map(len, replies))}, max {max(map(len, replies))}), batch {args.batch_size}, "
          "tiny Qwen2.5-VL, 3 beams, 5 new tokens")  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {(way, clock): [] for way in WAYS for clock in CLOCKS}
    for _ in range(args.repeats):
        outputs = {}
        for way in WAYS:
            wall, cpu, outputs[way] = timed(backend, prompts, replies if way == "generation + likelihoods" else None)
            times[way, "wall"].append(wall)
            times[way, "cpu"].append(cpu)
        if [g.raw for g in outputs[WAYS[0]]] != [g.raw for g in outputs[WAYS[1]]]:
            raise SystemExit("scoring replies changed an answer")
    for clock in CLOCKS:
        for way in WAYS:
            rounds = times[way, clock]
            print(f"{way:26s} {clock:4s} median {statistics.median(rounds):6.2f} s  "
                  f"(rounds: {', '.join(f'{t:.2f}' for t in rounds)})")  # fmt: skip
    for clock in CLOCKS:
        ratios = [both / alone for alone, both in zip(times[WAYS[0], clock], times[WAYS[1], clock])]
        print(f"{clock:4s} time ratio per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median overhead of the likelihoods: {100 * (statistics.median(ratios) - 1):+.1f}% (goal: <= +35%)")  # fmt: skip
    probabilities = [sum(map(math.exp, g.reply_logprobs)) for g in outputs[WAYS[1]]]
    print(f"identical answers: True; sum of the answers' probabilities per candidate: max {max(probabilities):.3g}")


WAYS = ("generation alone", "generation + likelihoods")
CLOCKS = ("cpu", "wall")


def timed(backend, prompts, replies):
    """Wall-clock seconds, CPU seconds of this process, and the Generations of one cold run."""
    backend.image_cache.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    out = backend.generate(prompts, replies)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert all(g.error is None for g in out), [g.error for g in out if g.error]
    return wall, cpu, out


if __name__ == "__main__":
    main()
