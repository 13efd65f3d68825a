"""The evaluation's numbers and files: headline, breakdown, per-query results.

* `metrics.json`: the headline that `dvc exp show` lists, one mean accuracy per method:
  `eval_pointer`, `eval_random`, `eval_retrieval`, `eval_zero`.
* `breakdown.json`: per method its mean with a bootstrap 95% interval, and the shares of its ICDs
  that share the query's answer or question type (what makes an ICD help or mislead); the paired
  comparisons pointer - random and pointer - retrieval; counts; the settings; and the identity of
  every input file (sha256) and of the VQA model and its settings.
* `results.json`: per validation row, its question, human answers, and for each method every ICD
  sequence with the answer it drew and its accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lever_lm.digests import file_digest
from lever_lm.evaluation.selection import METHODS, QueryICDs
from lever_lm.evaluation.statistics import bootstrap_mean, paired_comparison
from lever_lm.io import atomic_output
from lever_lm.vqa.backends import describe_settings
from lever_lm.vqa.metric import normalize_answer

if TYPE_CHECKING:
    from lever_lm.evaluation.icl import EvaluationInputs, EvaluationRequest, Scored

METRICS_FILE = "metrics.json"
BREAKDOWN_FILE = "breakdown.json"
RESULTS_FILE = "results.json"
HEADLINE = {method: f"eval_{method}" for method in METHODS}
DIGITS = 4


def query_scores(scored: list[dict[str, list[Scored]]]) -> dict[str, list[float]]:
    """Per method, each query's score: the mean accuracy of its sequences."""
    return {m: [sum(s.accuracy for s in q[m]) / len(q[m]) for q in scored] for m in METHODS}


def summarise(inputs: EvaluationInputs, scored: list[dict[str, list[Scored]]], seed: int) -> dict:
    """Headline, intervals, paired comparisons and ICD statistics (no settings or identities)."""
    scores = query_scores(scored)
    estimates = {m: bootstrap_mean(scores[m], seed=seed) for m in METHODS}
    icd_stats = icd_statistics(inputs, scored)
    prompts = {(q, s.icds): s.generation for q, by_method in zip(inputs.queries, scored)
               for sequences in by_method.values() for s in sequences}  # fmt: skip
    return {
        "headline": {HEADLINE[m]: round(estimates[m].mean, DIGITS) for m in METHODS},
        "queries": len(inputs.queries),
        "prompts": len(prompts),
        "failed_prompts": sum(g.error is not None for g in prompts.values()),
        "methods": {m: {**estimates[m].as_dict(DIGITS), **icd_stats[m]} for m in METHODS},
        "pointer_vs_random": paired_comparison(scores["pointer"], scores["random"], seed=seed).as_dict(DIGITS),
        "pointer_vs_retrieval": paired_comparison(scores["pointer"], scores["retrieval"], seed=seed).as_dict(DIGITS),
    }


def icd_statistics(inputs: EvaluationInputs, scored: list[dict[str, list[Scored]]]) -> dict[str, dict]:
    """Per method: the share of ICD slots that share the query's answer, and its question type."""
    stats = {}
    for method in METHODS:
        slots = same_answer = same_type = 0
        for query, by_method in zip(inputs.queries, scored):
            item = inputs.val[query]
            answer = normalize_answer(item.icd_answer)
            for sequence in by_method[method]:
                for row in sequence.icds:
                    icd = inputs.train[row]
                    slots += 1
                    same_answer += normalize_answer(icd.icd_answer) == answer
                    same_type += icd.question_type is not None and icd.question_type == item.question_type
        stats[method] = {
            "icd_same_answer": round(same_answer / slots, DIGITS) if slots else None,
            "icd_same_question_type": round(same_type / slots, DIGITS) if slots else None,
        }
    return stats


def settings_record(request: EvaluationRequest) -> dict:
    """The request's settings as plain JSON values."""
    return {
        **dataclasses.asdict(request.settings),
        "vqa_model": request.vqa_model,
        "eval_mode": request.eval_mode,
        "device": request.device,
        "batch_size": request.batch_size,
    }


def identities(request: EvaluationRequest) -> dict:
    """What the result was computed from, by content: input files and the VQA model with its settings."""
    files = {
        "ckpt": request.ckpt,
        "cand_emb": request.cand_emb,
        "val_query_emb": request.val_query_emb,
        "train_ques_path": request.dataset.train_ques_path,
        "train_ann_path": request.dataset.train_ann_path,
        "val_ques_path": request.val_ques_path,
        "val_ann_path": request.val_ann_path,
    }
    return {
        "files": {name: {"path": str(path), "sha256": file_digest(path)} for name, path in files.items()},
        "vqa_model": describe_settings(
            request.vqa_model, model_path=request.vqa_model_path, config=request.config, device=request.device
        ),
    }


def per_query_results(inputs: EvaluationInputs, choices: list[QueryICDs], scored: list[dict]) -> dict:
    results = {}
    for choice, by_method in zip(choices, scored):
        item = inputs.val[choice.query_idx]
        entry = {"question_id": item.question_id, "question": item.question, "answers": list(item.answers)}
        for method in METHODS:
            entry[method] = [_sequence_record(s) for s in by_method[method]]
        results[str(choice.query_idx)] = entry
    return results


def _sequence_record(s: Scored) -> dict:
    record = {"icds": list(s.icds), "answer": s.generation.answer, "accuracy": s.accuracy}
    if s.generation.error is not None:
        record["error"] = s.generation.error
    return record


def write_outputs(
    request: EvaluationRequest, inputs: EvaluationInputs, choices: list[QueryICDs], scored: list[dict]
) -> dict:
    """Write metrics.json, breakdown.json and results.json; return the breakdown."""
    summary = summarise(inputs, scored, seed=request.settings.seed)
    breakdown = {**summary, "settings": settings_record(request), "identity": identities(request)}
    _write_json(request.output_dir / RESULTS_FILE, per_query_results(inputs, choices, scored))
    _write_json(request.output_dir / BREAKDOWN_FILE, breakdown)
    _write_json(request.output_dir / METRICS_FILE, summary["headline"])  # last: its presence means all were written
    return breakdown


def _write_json(path: Path, value: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
