"""Candidates scored per second with the tiny Qwen2.5-VL: batched backend vs one candidate per generate call.

    .venv/bin/python benchmarks/bench_vqa_scoring.py                  # builds the demo in a temp dir
    .venv/bin/python benchmarks/bench_vqa_scoring.py --queries 48 --batch-size 64 --threads 2

The workload mimics the RL generator: `--queries` training queries, `--candidates` 2-shot
candidates each, whose ICDs come from a per-query shortlist of 8 items (beam and sampled
candidates of one query share ICDs) -- so every candidate shows its query's image again. Each
candidate is scored end to end: prompt -> generation (3 beams, 5 new tokens) -> post-processing
-> VQA accuracy against the query's human answers.

Three ways, in this process, one after the other, on the same candidates:
* lineage: one candidate per `generate` call through the processor, images read and processed
  for every candidate (the generic backend with batch size 1 and its image cache off);
* one-per-call: the Qwen2.5-VL backend with batch size 1 (image cache, shared prefill);
* batched: the Qwen2.5-VL backend with `--batch-size` candidates per call, across queries.
Every backend is warmed up on validation-split prompts first (other images), and its image
cache is emptied before each timed run, so each starts cold, as a real run does. The ways take
turns for `--repeats` rounds and each way's fastest round counts (the machine is shared, and the
minimum is the least disturbed measurement). The answers of all three must be identical.
"""

# ruff: noqa: E402 -- the process settings are applied before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from lever_lm.demo.build import build_demo
from lever_lm.demo.dataset import Split
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.metric import prepare_answers, score_prediction
from lever_lm.vqa.prompts import FewShotPrompt, Shot


def split_items(split: Split) -> list[dict]:
    """Questions joined with their answers: image path, question, ICD answer, the raw answers."""
    questions = json.loads(split.questions_path.read_text(encoding="utf-8"))["questions"]
    annotations = {
        a["question_id"]: a for a in json.loads(split.annotations_path.read_text(encoding="utf-8"))["annotations"]
    }
    items = []
    for q in sorted(questions, key=lambda q: q["question_id"]):
        annotation = annotations[q["question_id"]]
        items.append({
            "image": split.image_path(q["image_id"]),
            "question": q["question"],
            "icd_answer": annotation["multiple_choice_answer"],
            "answers": [a["answer"] for a in annotation["answers"]],
        })  # fmt: skip
    return items


def candidates(
    items: list[dict], queries: int, per_query: int, shots: int, seed: int
) -> list[tuple[int, FewShotPrompt]]:
    """(query row, prompt) for `per_query` candidates of each of `queries` queries."""
    rng = random.Random(seed)
    out = []
    for query in rng.sample(range(len(items)), queries):
        shortlist = rng.sample([i for i in range(len(items)) if i != query], 8)
        for _ in range(per_query):
            icds = rng.sample(shortlist, shots)
            shot_list = tuple(Shot(items[i]["image"], items[i]["question"], items[i]["icd_answer"]) for i in icds)
            out.append((query, FewShotPrompt(shot_list, Shot(items[query]["image"], items[query]["question"]))))
    return out


def score_all(
    backend, work: list[tuple[int, FewShotPrompt]], items: list[dict]
) -> tuple[float, list[tuple[str, float]]]:
    """Seconds to score every candidate end to end, and each candidate's (raw generation, accuracy)."""
    start = time.perf_counter()
    generations = backend.generate([prompt for _, prompt in work])
    prepared = {q: prepare_answers(items[q]["answers"]) for q in {q for q, _ in work}}
    scored = [(g.raw, score_prediction(g.answer, prepared[q])) for (q, _), g in zip(work, generations)]
    seconds = time.perf_counter() - start
    assert all(g.error is None for g in generations), [g.error for g in generations if g.error]
    return seconds, scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, help="an already built demo (default: build one in a temp dir)")
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=10, help="candidates per query")
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine more threads than free cores "
        "make every op spin-wait, and the timings measure the neighbours)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each way's fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        demo = args.demo_dir or Path(tmp)
        if args.demo_dir is None:
            build_demo(demo, seed=0)
        run(demo, args)


def run(demo: Path, args) -> None:
    train, val = split_items(Split("train", demo / "vqa")), split_items(Split("val", demo / "vqa"))
    work = candidates(train, args.queries, args.candidates, args.shots, args.seed)
    warmup = [prompt for _, prompt in candidates(val, 2, 2, args.shots, args.seed)]
    model = str(demo / "models" / "qwen2.5-vl-tiny")
    ways = {
        "lineage (1 per call, no cache)": ("hf_image_text_to_text", 1, 0),
        "one per call (cached)": ("qwen2.5_vl_3B", 1, None),
        f"batched ({args.batch_size} per call)": ("qwen2.5_vl_3B", args.batch_size, None),
    }
    distinct_images = len({path for _, prompt in work for path in prompt.images})
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")  # fmt: skip
    print(f"workload: {args.queries} queries x {args.candidates} candidates = {len(work)} candidates, "
          f"{args.shots} shots, {distinct_images} distinct images, tiny Qwen2.5-VL, 3 beams, 5 new tokens")  # fmt: skip
    backends = {}
    for label, (name, batch_size, cache_mb) in ways.items():
        config = {"vqa_model": {"image_cache_mb": cache_mb}} if cache_mb is not None else None
        backends[label] = load_backend(name, model_path=model, config=config, batch_size=batch_size)
        backends[label].generate(warmup)
    rounds: dict[str, list[float]] = {label: [] for label in ways}
    results = {}
    for _ in range(args.repeats):
        for label, backend in backends.items():
            backend.image_cache.clear()
            seconds, scored = score_all(backend, work, train)
            rounds[label].append(seconds)
            results[label] = (min(rounds[label]), scored)
    for label, times in rounds.items():
        best = min(times)
        spread = ", ".join(f"{t:.2f}" for t in times)
        print(f"{label:34s} {best:8.2f} s  {len(work) / best:8.1f} candidates/s   (rounds: {spread} s)")
    labels = list(ways)
    baseline_label, batched_label = labels[0], labels[-1]
    answers = [scored for _, scored in results.values()]
    same = all(a == answers[0] for a in answers)
    print(f"identical answers and scores in all three: {same}")
    base = results[baseline_label][0]
    for label, (seconds, _) in results.items():
        if label != baseline_label:
            print(f"speed-up of {label} over the lineage way: {base / seconds:.1f}x")
    one = results["one per call (cached)"][0]
    print(f"speed-up of batching alone (batched vs one per call, both cached): {one / results[batched_label][0]:.1f}x")
    if not same:
        raise SystemExit("answers differ between the ways")


if __name__ == "__main__":
    main()
