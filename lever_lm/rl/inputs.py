"""Read and cross-check every input of a generation run before any model is loaded.

The data set, the beam data, both embedding files, the SFT checkpoint, the scoring annotations
and, with per-query pools, the sampler cache are read here; every problem is an `InputError`
naming its file, so a long GPU job fails in seconds, not hours in.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from lever_lm.data.beam_data import BeamData, load_beam_data
from lever_lm.data.embeddings import check_embedding_pair, load_embeddings
from lever_lm.data.vqa import AnswerTable, VQADataset
from lever_lm.digests import file_digest
from lever_lm.errors import InputError
from lever_lm.io import read_json
from lever_lm.models.v2.checkpoint import load_pointer_checkpoint
from lever_lm.models.v2.pointer_selector import PointerSelectorV2
from lever_lm.models.v3.pools import QueryPools, load_pools
from lever_lm.models.v3.proposals import ProposalSettings
from lever_lm.rl.request import GenerationRequest

log = logging.getLogger(__name__)

EXPORT_HINT = (
    "python -m lever_lm.models.v3.export_embeddings --clip_model <CLIP dir> --output_dir <dir> "
    "(with the same --train_* / --config / --dataset as here)"
)


@dataclass
class Inputs:
    """The checked inputs of a run."""

    dataset: VQADataset
    beam: BeamData
    query_emb: torch.Tensor
    cand_emb: torch.Tensor
    pointer: PointerSelectorV2
    proposal: ProposalSettings
    all_queries: list[int]  # beam-data order, every key
    queries: list[int]  # the first --limit of them (all without --limit)
    scoring_answers: dict[int, tuple[str, ...]]  # every query row -> the human answers that score it
    pools: QueryPools | None = None  # each query's own pool (--pool per_query); None: the global pool


def load_inputs(request: GenerationRequest) -> Inputs:
    """Read and cross-check every input; every problem is an InputError naming its file."""
    dataset = request.dataset.load()
    beam = load_beam_data(request.beam_data, len(dataset))
    for path in (request.query_emb, request.cand_emb):
        if not Path(path).is_file():
            raise InputError(path, f"embeddings file not found; export them first: {EXPORT_HINT}")
    query_emb = load_embeddings(request.query_emb, len(dataset))
    # The export writes two identical files: one tensor then serves both (half the time and memory).
    same = same_content(request.cand_emb, request.query_emb)
    cand_emb = query_emb if same else load_embeddings(request.cand_emb, len(dataset))
    check_embedding_pair(query_emb, cand_emb, request.query_emb, request.cand_emb)
    proposal = dataclasses.replace(request.proposal, shot_num=request.shot_num or beam.shot_num)
    all_queries = list(beam.query_ids)
    queries = all_queries[: request.limit] if request.limit else all_queries
    # every beam-data query: a block is proposed whole, even the part of it beyond --limit
    pools = load_pools(
        request.pools,
        all_queries,
        proposal.shot_num,
        dataset.image_ids,
        proposal.exclude_same_image,
        proposal.seed,
        query_emb,
        cand_emb,
        request.device,
    )
    pointer = load_pointer_checkpoint(request.sft_ckpt)
    if pointer.input_dim != cand_emb.shape[1]:
        raise InputError(
            request.sft_ckpt,
            f"pointer input dim {pointer.input_dim} does not match the embeddings' d = {cand_emb.shape[1]} "
            f"({request.cand_emb})",
        )
    proposal = dataclasses.replace(request.proposal, shot_num=request.shot_num or beam.shot_num)
    all_queries = list(beam.query_ids)
    queries = all_queries[: request.limit] if request.limit else all_queries
    # a block straddling --limit scores them all
    answers = scoring_answers(dataset, all_queries, request.val_ann_path, request.val_ques_path)
    return Inputs(dataset, beam, query_emb, cand_emb, pointer.eval(), proposal, all_queries, queries, answers, pools)


def scoring_answers(
    dataset: VQADataset, queries: list[int], val_ann_path: Path | None, val_ques_path: Path | None = None
) -> dict[int, tuple[str, ...]]:
    """The human answers that score each query: from `val_ann_path` when it holds the question
    (docs/formats.md §2, note), else from the training annotations the data set was read with.
    The generator and the validator both call this: one rule for which annotations score a query.
    Scoring files with the training files' content (the pipeline's default) are not read again."""
    val: AnswerTable | None = None
    if val_ann_path is not None and not same_content(val_ann_path, dataset.annotations_path):
        if val_ques_path is not None and not same_content(val_ques_path, dataset.questions_path):
            _check_questions_file(val_ques_path)  # questions themselves come from the data set
        val = AnswerTable.load(val_ann_path)
    answers, from_train = {}, 0
    for query in queries:
        item = dataset[query]
        found = val.get(item.question_id) if val is not None else None
        if found is not None:
            answers[query] = found
        else:
            answers[query] = item.answers
            from_train += 1
        if not answers[query]:
            where = val_ann_path or dataset.annotations_path
            raise InputError(where, f"no answers for question {item.question_id}")
    if val is not None and from_train:
        log.info(
            "%d of %d queries are not in %s; scored with the training annotations",
            from_train,
            len(queries),
            val_ann_path,
        )
    return answers


def same_content(path: Path, other: Path) -> bool:
    """Whether two input files hold the same bytes (by their cached content digests)."""
    path, other = Path(path), Path(other)
    return path.is_file() and other.is_file() and file_digest(path) == file_digest(other)


def _check_questions_file(path: Path) -> None:
    if not isinstance(read_json(path).get("questions"), list):
        raise InputError(path, "missing the 'questions' list (is this an official VQA questions file?)")
