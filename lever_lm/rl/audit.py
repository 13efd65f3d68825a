"""Audit an RL data file: re-run the VQA model on some candidates and compare with the file.

Every other check of validation can be satisfied by a file made up together with its sidecar
(answers set to a likely human answer, accuracies recomputed to match). Only the model can tell:
`run_audit` draws N candidates at random (seeded: the same N for the same file and seed), builds
each one's few-shot prompt from the data set exactly as the generator does, runs the run's VQA
model on it -- loaded from where the sidecar says, and refused unless its content, prompt,
decoding and numerics are those the run's fingerprint records -- and compares the raw answer and
its accuracy with the file's. On the CPU in float32 the answers are the run's exactly (batch
composition moves only the last bits of the logits: 0 of 240 answers differed on the demo at
batch 1 and 7 against the run's 16); on a GPU in bf16 a near-tie may flip, so up to a `tolerance`
share of differing candidates passes (default 5%; one in 16 fails it).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from lever_lm.config import load_config
from lever_lm.data.vqa import VQADataset
from lever_lm.errors import InputError
from lever_lm.rl.meta import RunMeta
from lever_lm.rl.records import GLOBAL_POINTER_FIELD
from lever_lm.vqa.backends import describe_settings, load_backend
from lever_lm.vqa.metric import prepare_answers, score_prediction
from lever_lm.vqa.prompts import build_prompt

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.05
MAX_LISTED = 5


@dataclass(frozen=True)
class AuditSettings:
    """How many candidates to re-run (0: no audit), the draw's seed, where, and how many may differ."""

    candidates: int
    seed: int = 0
    device: str | None = None  # None: the run's device
    tolerance: float = DEFAULT_TOLERANCE


def run_audit(rl_path: Path, data: dict, meta: RunMeta, dataset: VQADataset, settings: AuditSettings) -> dict:
    """Re-run the run's VQA model on `settings.candidates` random candidates; InputError when too many differ.

    Returns the report: how many candidates were drawn from how many, the seed, and how many
    answers and accuracies differ (failed evaluations are not drawn: they have no answer).
    """
    drawable = [
        (int(key), n)
        for key, entry in data.items()
        for n, candidate in enumerate(entry["pointer_candidates"])
        if not candidate["eval_failed"]
    ]
    chosen = sorted(random.Random(settings.seed).sample(drawable, min(settings.candidates, len(drawable))))
    report = {"candidates": len(chosen), "of": len(drawable), "seed": settings.seed}
    if not chosen:
        return {**report, "answers_differ": 0, "accuracies_differ": 0}
    backend = _run_backend(meta, settings.device or meta.run.device)
    candidates = [data[str(q)]["pointer_candidates"][n] for q, n in chosen]
    prompts = [
        build_prompt(dataset, q, c.get(GLOBAL_POINTER_FIELD, c["pointer"])) for (q, _), c in zip(chosen, candidates)
    ]
    generations = []
    for start in range(0, len(prompts), backend.batch_size):
        generations += backend.generate(prompts[start : start + backend.batch_size], None)
    differ_answer, differ_accuracy, listed = 0, 0, []
    for (query, n), candidate, generation in zip(chosen, candidates, generations, strict=True):
        answers = data[str(query)]["query"]["gt_answers_raw"]
        accuracy = (
            0.0
            if generation.error
            else score_prediction(generation.answer, prepare_answers(answers, meta.settings.eval_mode))
        )
        answer_differs = generation.error is not None or generation.raw != candidate["vqa_raw_generation"]
        accuracy_differs = abs(accuracy - candidate["vqa_acc_score"]) > 1e-9
        differ_answer += answer_differs
        differ_accuracy += accuracy_differs
        if answer_differs or accuracy_differs:
            listed.append(
                f"query {query}, candidate {n}: the model answers {generation.raw!r} ({accuracy:g}), "
                f"the file says {candidate['vqa_raw_generation']!r} ({candidate['vqa_acc_score']:g})"
            )
    report |= {"answers_differ": differ_answer, "accuracies_differ": differ_accuracy}
    if len(listed) > settings.tolerance * len(chosen):
        raise InputError(
            rl_path,
            f"audit failed: the run's VQA model, re-run on {len(chosen)} of {len(drawable)} candidates "
            f"(seed {settings.seed}), differs on {len(listed)} (tolerance {settings.tolerance:.0%}): the file does "
            f"not hold this model's answers; {'; '.join(listed[:MAX_LISTED])}",
        )
    return report


def _run_backend(meta: RunMeta, device: str):
    """The run's VQA model, loaded from where the sidecar says; refused unless the fingerprint's settings match."""
    source = meta.model
    config = load_config(source.config_path) if source.config_path else {}
    found = describe_settings(source.vqa_model, model_path=source.vqa_model_path, config=config, device=device)
    differ = sorted(k for k in {*found, *meta.settings.vqa} if found.get(k) != meta.settings.vqa.get(k))
    if differ:
        where = source.vqa_model_path or source.vqa_model
        raise InputError(
            where,
            f"the VQA model here differs from the run's in {', '.join(differ)}: the audit needs the run's model, "
            f"settings and device type ({meta.run.device})",
        )
    log.info("audit: loading %s on %s", source.vqa_model_path or source.vqa_model, device)
    return load_backend(
        source.vqa_model, model_path=source.vqa_model_path, device=device, config=config, batch_size=meta.run.batch_size
    )
