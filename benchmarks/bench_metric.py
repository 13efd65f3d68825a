"""VQA accuracy alone: candidates scored per second (target >= 50,000/s), against the naive per-candidate loop.

    .venv/bin/python benchmarks/bench_metric.py
    .venv/bin/python benchmarks/bench_metric.py --questions 20000 --candidates 10

Workload: `--questions` questions with 10 human answers each (drawn from the demo's answer style:
number words, articles, capitals, full stops, disagreeing annotators), `--candidates` predictions
per question drawn from the same vocabulary -- models repeat answers, so the normalisation memo
is exercised as in a real run. Three timings, same process, same data:
* naive: the official loop per candidate (normalise the 10 answers and the prediction, then
  compare every answer with the other nine) -- what scoring without preparation costs;
* prepared: `prepare_answers` once per question, `score_prediction` per candidate (the library);
* prepared, all-distinct: the same with every prediction made unique and the memo cleared, the
  worst case for the memo.
All three must give the same scores.
"""

# ruff: noqa: E402 -- the process settings are applied before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import platform
import random
import time

from lever_lm.vqa.metric import (
    clean_whitespace,
    normalize_answer,
    prepare_answers,
    process_digits_and_articles,
    process_punctuation,
    score_prediction,
)

BASE = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "left", "right", "yes", "no",
        "1", "2", "3", "4", "dark green", "pizza", "hot dog", "tennis racket", "fire hydrant"]  # fmt: skip
NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four"}


def surface(rng: random.Random, answer: str) -> str:
    """One annotator's or model's spelling of an answer."""
    roll = rng.random()
    if answer in NUMBER_WORDS and roll < 0.3:
        return NUMBER_WORDS[answer]
    if roll < 0.4:
        return "a " + answer
    if roll < 0.5:
        return answer.capitalize() + "."
    if roll < 0.55:
        return answer.replace(" ", "-")
    return answer


def workload(questions: int, candidates: int, seed: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(questions):
        right, wrong = rng.sample(BASE, 2)
        agreeing = rng.choice((10, 9, 8, 6, 3))
        gt = [surface(rng, right) for _ in range(agreeing)] + [surface(rng, wrong) for _ in range(10 - agreeing)]
        rng.shuffle(gt)
        preds = [surface(rng, rng.choice((right, right, wrong, rng.choice(BASE)))) for _ in range(candidates)]
        out.append((gt, preds))
    return out


def naive_score(prediction: str, gt_answers: list[str]) -> float:
    """The official loop, per candidate, no preparation and no memo."""
    gts = [process_digits_and_articles(process_punctuation(clean_whitespace(a))) for a in gt_answers]
    res = process_digits_and_articles(process_punctuation(clean_whitespace(prediction)))
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def prepared_scores(work: list[tuple[list[str], list[str]]]) -> list[float]:
    scores = []
    for gt, preds in work:
        prepared = prepare_answers(gt)
        scores.extend(score_prediction(p, prepared) for p in preds)
    return scores


def timed(label: str, count: int, fn):
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    print(f"{label:28s} {seconds:7.3f} s  {count / seconds:12,.0f} candidates/s")
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=20_000)
    parser.add_argument("--candidates", type=int, default=10, help="candidates per question")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = workload(args.questions, args.candidates, args.seed)
    n = args.questions * args.candidates
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"{args.questions} questions x {args.candidates} candidates = {n} candidates")  # fmt: skip
    naive_s, naive = timed(
        "naive (official loop)", n, lambda: [naive_score(p, gt) for gt, preds in work for p in preds]
    )
    normalize_answer.cache_clear()
    fast_s, fast = timed("prepared", n, lambda: prepared_scores(work))
    distinct = [(gt, [f"{p} {q}x{i}" for i, p in enumerate(preds)]) for q, (gt, preds) in enumerate(work)]
    normalize_answer.cache_clear()
    timed("prepared, all-distinct", n, lambda: prepared_scores(distinct))
    same = all(abs(a - b) < 1e-12 for a, b in zip(naive, fast))
    print(f"identical scores: {same}; speed-up of prepared over naive: {naive_s / fast_s:.1f}x; "
          f"target >= 50,000 candidates/s: {'met' if n / fast_s >= 50_000 else 'NOT met'}")  # fmt: skip
    if not same:
        raise SystemExit("scores differ")


if __name__ == "__main__":
    main()
