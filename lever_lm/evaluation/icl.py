"""In-context VQA accuracy on the validation split, for ICDs chosen by a pointer, at random, by retrieval, or none.

`run_evaluation(request)` is the whole job behind `python -m lever_lm.evaluation`:

1. read and cross-check every input before any model is loaded: the training split (the ICD
   pool) and its embeddings, the validation split (the queries) and its embeddings, the pointer
   checkpoint (any file `lever_lm.models.v2.checkpoint` loads). A validation question that is
   also a training question is refused: evaluation queries are never training rows, so a query
   can never be its own ICD;
2. choose each query's ICDs by every method (`lever_lm.evaluation.selection`);
3. build each distinct (query, ICD sequence) prompt once, in a fixed order, and run them through
   the VQA backend in batches: the same prompts with the same batch-mates on every run;
4. score each answer with the VQA accuracy against the query's human answers; a method's score
   for a query is the mean over its sequences (the random draws);
5. summarise (`lever_lm.evaluation.report`) and write three files into the output directory:
   `metrics.json` (the headline: eval_pointer, eval_random, eval_retrieval, eval_zero),
   `breakdown.json` (intervals, paired comparisons, ICD statistics, settings, input identities)
   and `results.json` (every query's ICDs, answers and scores).

Deterministic: the ICD choices come from seeded per-query generators and the prompts run in a fixed
order, so the same inputs and settings give the same files on the same machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.embeddings import load_embeddings
from lever_lm.data.vqa import VQADataset
from lever_lm.errors import InputError
from lever_lm.evaluation.report import write_outputs
from lever_lm.evaluation.selection import QueryICDs, choose_icds
from lever_lm.models.v2.checkpoint import load_pointer_checkpoint
from lever_lm.models.v2.pointer_selector import PointerSelectorV2
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.base import Generation, VQABackend, resolve_device
from lever_lm.vqa.metric import MODES, prepare_answers, score_prediction
from lever_lm.vqa.prompts import build_prompt

log = logging.getLogger(__name__)

# Prompts handed to the backend per call (it batches them by its own batch size): bounds the
# prepared prompts held at once and paces the progress bar.
PROMPTS_PER_CALL = 256


@dataclass(frozen=True)
class EvaluationSettings:
    """What shapes the result besides the inputs; the command line's defaults come from here."""

    shot_num: int = 2
    num_beams: int = 1  # the pointer's ICDs: top beam of a beam search this wide (1: greedy)
    num_random: int = 3  # random ICD sequences per query (their mean accuracy is the query's random score)
    seed: int = 0  # of the random ICDs and of the bootstrap
    num_queries: int | None = None  # the first N validation rows (by question_id); None: all

    def __post_init__(self) -> None:
        for name in ("shot_num", "num_beams", "num_random"):
            if getattr(self, name) < 1:
                raise InputError(None, f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_queries is not None and self.num_queries < 1:
            raise InputError(None, f"num_queries must be >= 1 (or unset for all), got {self.num_queries}")


@dataclass(frozen=True)
class EvaluationRequest:
    """Everything the command line (or a stage) decided; paths not yet checked."""

    ckpt: Path
    cand_emb: Path  # embeddings of the training split: the ICD pool
    val_query_emb: Path  # embeddings of the validation split: the queries
    dataset: DatasetPaths  # the training split
    val_ques_path: Path
    val_ann_path: Path
    val_image_root: Path
    output_dir: Path
    settings: EvaluationSettings = EvaluationSettings()
    vqa_model: str = "qwen2.5_vl_3B"
    vqa_model_path: str | None = None
    config: dict = field(default_factory=dict)
    eval_mode: str = "always"
    device: str = "cuda:0"
    batch_size: int | None = None  # None: the VQA model's (vqa_model.batch_size)
    progress: bool = True


@dataclass
class EvaluationInputs:
    """The checked inputs of an evaluation."""

    train: VQADataset
    val: VQADataset
    cand_emb: torch.Tensor
    query_emb: torch.Tensor
    pointer: PointerSelectorV2
    queries: list[int]  # validation rows


@dataclass(frozen=True)
class Scored:
    """One ICD sequence of one query, with the model's answer and its accuracy."""

    icds: tuple[int, ...]
    generation: Generation
    accuracy: float


def run_evaluation(request: EvaluationRequest, backend: VQABackend | None = None) -> dict:
    """Evaluate, write the three output files, return the summary (the breakdown's content).

    `backend`: an already loaded VQA backend; by default the request's model is loaded.
    """
    started = time.time()
    check_request(request)
    inputs = load_evaluation_inputs(request)
    s = request.settings
    log.info("choosing ICDs for %d validation queries from %d training items", len(inputs.queries), len(inputs.train))
    choices = choose_icds(
        inputs.pointer,
        inputs.query_emb,
        inputs.cand_emb,
        inputs.queries,
        shot_num=s.shot_num,
        num_beams=s.num_beams,
        num_random=s.num_random,
        seed=s.seed,
        device=request.device,
    )
    backend = backend or load_backend(
        request.vqa_model,
        model_path=request.vqa_model_path,
        device=request.device,
        config=request.config,
        batch_size=request.batch_size,
    )
    scored = score_choices(inputs, choices, backend, request.eval_mode, request.progress)
    summary = write_outputs(request, inputs, choices, scored)
    log.info("evaluated %d queries in %.0f s: %s", len(inputs.queries), time.time() - started, summary["headline"])
    return summary


def check_request(request: EvaluationRequest) -> None:
    """Settings that cannot work, refused before anything is read."""
    if request.eval_mode not in MODES:
        raise InputError(None, f"--eval_mode must be one of {', '.join(MODES)}")
    if request.batch_size is not None and request.batch_size < 1:
        raise InputError(None, f"--batch_size must be >= 1 (got {request.batch_size})")
    if request.output_dir.exists() and not request.output_dir.is_dir():
        raise InputError(request.output_dir, "--output_dir is a file, not a directory")
    resolve_device(request.device)


def load_evaluation_inputs(request: EvaluationRequest) -> EvaluationInputs:
    """Read and cross-check every input; every problem is an InputError naming its file."""
    train = request.dataset.load()
    val = VQADataset.load(request.val_ques_path, request.val_ann_path, request.val_image_root)
    check_held_out(train, val, request.val_ques_path)
    cand_emb = load_embeddings(request.cand_emb, len(train))
    query_emb = load_embeddings(request.val_query_emb, len(val))
    if query_emb.shape[1] != cand_emb.shape[1]:
        raise InputError(
            request.val_query_emb,
            f"embeddings of dimension {query_emb.shape[1]}, but the training split's ({request.cand_emb}) have "
            f"{cand_emb.shape[1]}: both must come from the same CLIP",
        )
    pointer = load_pointer_checkpoint(request.ckpt)
    if pointer.input_dim != cand_emb.shape[1]:
        raise InputError(
            request.ckpt,
            f"pointer input dim {pointer.input_dim} does not match the embeddings' d = {cand_emb.shape[1]} "
            f"({request.cand_emb})",
        )
    if request.settings.shot_num >= len(train):
        raise InputError(None, f"shot_num {request.settings.shot_num} needs more than {len(train)} training items")
    n = request.settings.num_queries
    queries = list(range(len(val) if n is None else min(n, len(val))))
    return EvaluationInputs(train, val, cand_emb, query_emb, pointer, queries)


def check_held_out(train: VQADataset, val: VQADataset, val_ques_path: Path) -> None:
    """Refuse a validation split that shares a question with the training split."""
    train_ids = {train[i].question_id for i in range(len(train))}
    shared = [val[i].question_id for i in range(len(val)) if val[i].question_id in train_ids]
    if shared:
        raise InputError(
            val_ques_path,
            f"{len(shared)} of {len(val)} validation questions are also training questions (first: question_id "
            f"{shared[0]}); evaluation queries must be held out from the training split, the ICD pool",
        )


def score_choices(
    inputs: EvaluationInputs, choices: list[QueryICDs], backend: VQABackend, eval_mode: str, progress: bool = True
) -> list[dict[str, list[Scored]]]:
    """Every query's sequences, per method, with the VQA model's answers and their accuracies."""
    order = list(dict.fromkeys(_prompt_keys(choices)))  # each distinct (query, ICDs) once, in a fixed order
    generations: dict[tuple[int, tuple[int, ...]], Generation] = {}
    with tqdm(total=len(order), unit="prompt", desc="evaluating", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), PROMPTS_PER_CALL):
            keys = order[start : start + PROMPTS_PER_CALL]
            prompts = [build_prompt(inputs.train, query, icds, inputs.val) for query, icds in keys]
            backend.prefetch(prompts)
            generations.update(zip(keys, backend.generate(prompts), strict=True))
            bar.update(len(keys))
    failed = sum(g.error is not None for g in generations.values())
    if failed:
        log.warning("%d of %d prompts failed and score 0 (see results.json)", failed, len(generations))
    scored = []
    for choice in choices:
        prepared = prepare_answers(list(inputs.val[choice.query_idx].answers), mode=eval_mode)
        by_method = {}
        for method, sequences in choice.sequences().items():
            results = [generations[(choice.query_idx, icds)] for icds in sequences]
            by_method[method] = [
                Scored(icds, g, 0.0 if g.error else score_prediction(g.answer, prepared))
                for icds, g in zip(sequences, results)
            ]
        scored.append(by_method)
    return scored


def _prompt_keys(choices: list[QueryICDs]) -> Iterator[tuple[int, tuple[int, ...]]]:
    for choice in choices:
        for sequences in choice.sequences().values():
            for icds in sequences:
                yield choice.query_idx, icds
