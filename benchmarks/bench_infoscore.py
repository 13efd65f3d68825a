"""InfoScore beam data: this stage's batched search against the lineage's one prompt per forward, tiny Qwen2.5-VL.

    .venv/bin/python benchmarks/bench_infoscore.py                       # builds the demo in a temp dir
    .venv/bin/python benchmarks/bench_infoscore.py --backend flamingo_3B

The workload: `--queries` training queries, each with a random pool of `--pool` rows, searched
with the lineage's settings (2 shots, 5 beams); the ICD goes right before the query, so that a
beam's expansions share its ICDs. Three ways, on the same backend and the same queries:

- `lineage`: the lineage's way as its Qwen fork runs it (`generate_data.py`, batch size 1):
  one prompt per forward pass, P(S) scored again for each beam (1 + C + B * (1 + C - 1) prompts);
- `batched`: every expansion of a step in one call, cut into batches of `--batch-size`, each
  prompt prefilled in full (`score_replies` without the shared prefix);
- `stage`: what the `beam_data` stage runs: batched, and each batch's common prefix (system turn,
  the beam's ICDs) run once (`BeamSearcher`).

All three must keep the same beams (their probabilities agree to 1e-5). Rounds take turns, each
with a cold image cache; per round the ratio of each way's time to `lineage`'s, the median ratio
counts. CPU time (one torch thread) is the work done and stays put when other jobs share the
machine; wall-clock time is printed too.
"""

# ruff: noqa: E402 -- the process settings are applied before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lever_lm.data.vqa import VQADataset
from lever_lm.demo.build import build_demo
from lever_lm.demo.dataset import Split
from lever_lm.infoscore.generate import BeamInputs, BeamSearcher
from lever_lm.infoscore.probability import AnswerProbability
from lever_lm.infoscore.search import SearchSettings, info_score_search
from lever_lm.models.v3.samplers import draw_queries, sample_pools
from lever_lm.vqa.backends import load_backend

MODELS = {"qwen2.5_vl_3B": "qwen2.5-vl-tiny", "flamingo_3B": "openflamingo-tiny"}
WAYS = ("lineage", "batched", "stage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, help="an already built demo (default: build one in a temp dir)")
    parser.add_argument("--backend", default="qwen2.5_vl_3B", choices=tuple(MODELS))
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--pool", type=int, default=64, help="rows per pool (the lineage's candidate_num)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings when shared)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median ratio counts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo_dir or Path(tmp)
        if args.demo_dir is None:
            build_demo(demo, seed=0)
        run(demo, args)


def run(demo: Path, args) -> None:
    split = Split("train", demo / "vqa")
    dataset = VQADataset.load(split.questions_path, split.annotations_path, split.image_root)
    queries = draw_queries(len(dataset), args.queries, seed=1)
    pools = sample_pools("rand", queries, dataset.image_ids, pool_size=args.pool, seed=1)
    settings = SearchSettings(shot_num=2, beam_size=5)
    backend = load_backend(
        args.backend, model_path=str(demo / "models" / MODELS[args.backend]), batch_size=args.batch_size
    )
    inputs = BeamInputs(dataset, pools, queries, queries)
    BeamSearcher(inputs, backend, settings).search(queries[0])  # warm-up

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
          f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    print(f"workload: {args.backend} (demo tiny), {args.queries} queries, pools of {args.pool}, 2 shots, 5 beams, "
          f"construct order right, batch {args.batch_size}")  # fmt: skip
    times = {(way, clock): [] for way in WAYS for clock in ("cpu", "wall")}
    prompts = {}
    for _ in range(args.repeats):
        beams = {}
        for way in WAYS:
            backend.image_cache.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            beams[way], prompts[way] = search_all(way, backend, inputs, settings)
            times[way, "wall"].append(time.perf_counter() - wall)
            times[way, "cpu"].append(time.process_time() - cpu)
        check_same_beams(beams)
    for way in WAYS:
        print(f"{way:8s} {prompts[way]:6d} prompts  cpu median {statistics.median(times[way, 'cpu']):7.2f} s, "
              f"wall median {statistics.median(times[way, 'wall']):7.2f} s  "
              f"(cpu rounds: {', '.join(f'{t:.2f}' for t in times[way, 'cpu'])})")  # fmt: skip
    for way in WAYS[1:]:
        for clock in ("cpu", "wall"):
            ratios = [base / other for base, other in zip(times["lineage", clock], times[way, clock])]
            print(f"{way} vs lineage, {clock}: {statistics.median(ratios):.2f}x faster "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    print("same beams in every way: True")


def search_all(way: str, backend, inputs: BeamInputs, settings: SearchSettings) -> tuple[dict, int]:
    """Every query's beams (ICDs, P) and the prompts scored, the `way` of the module doc."""
    out, prompts = {}, 0
    backend.share_prefix = way == "stage"
    for query in inputs.queries:
        if way == "stage":
            result = BeamSearcher(inputs, backend, settings).search(query)
            out[query] = [(tuple(ids[:-1]), sum(gains)) for ids, gains in zip(
                result.entry["id_list"], result.entry["shot_scores"])]  # fmt: skip
            prompts += result.work
            continue
        batched = AnswerProbability(backend, inputs.dataset, query)
        counter = [0]

        def one_by_one(sequences, batched=batched, counter=counter):
            counter[0] += len(sequences)
            return [p for s in sequences for p in batched([s])]

        def lineage(sequences, one_by_one=one_by_one):
            if sequences and len(sequences[0]) > 1:  # step 2 on: the lineage scores P(S) again per beam
                one_by_one(list(dict.fromkeys(tuple(s[:-1]) for s in sequences)))
            return one_by_one(sequences)

        def counted(sequences, batched=batched, counter=counter):
            counter[0] += len(sequences)
            return batched(sequences)

        result = info_score_search(lineage if way == "lineage" else counted, inputs.pools[query], settings)
        out[query] = [(beam.icds, sum(beam.gains)) for beam in result.beams]
        prompts += counter[0]
    return out, prompts


def check_same_beams(beams: dict) -> None:
    for way in WAYS[1:]:
        for query, kept in beams["lineage"].items():
            other = beams[way][query]
            if [icds for icds, _ in kept] != [icds for icds, _ in other] or any(
                abs(a - b) > 1e-5 for (_, a), (_, b) in zip(kept, other)
            ):
                raise SystemExit(f"{way} kept other beams than lineage for query {query}: {other} vs {kept}")


if __name__ == "__main__":
    main()
