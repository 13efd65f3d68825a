"""RL data generation: inputs -> proposals -> batched VQA scoring -> journal -> final JSON.

`run_generation(request)` is the whole job behind `python -m lever_lm.models.v3.generate_rl_data`:

1. read and check every input (data set, beam data, embeddings, SFT checkpoint, scoring
   annotations, settings) -- a bad one stops the run here, before any model is loaded;
2. open the journal of this run's fingerprint and shard (a second writer is refused);
3. load the VQA model, then for each block of queries: propose candidates with the SFT pointer,
   build every candidate's few-shot prompt, generate answers in batches across queries, score
   them, and journal each query as soon as all its candidates are scored;
4. write the final JSON from the journal (single run) or leave the shard journal for a merge.

Determinism: queries are proposed in fixed blocks of PROPOSAL_BLOCK consecutive beam-data queries
(blocks are also the unit of sharding), and a block is always proposed whole, even when resuming
with part of it done. So a resumed or sharded run computes exactly the same floating-point
proposals as a single run, and the final JSON is byte-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lever_lm.data.beam_data import BeamData, load_beam_data
from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.embeddings import check_embedding_pair, load_embeddings
from lever_lm.data.vqa import VQADataset, load_annotations, read_json_object
from lever_lm.errors import InputError
from lever_lm.models.v2.checkpoint import load_pointer_checkpoint
from lever_lm.models.v2.pointer_selector import PointerSelectorV2
from lever_lm.models.v3.proposals import Candidate, ProposalSettings, Proposer, QueryProposals
from lever_lm.rl import fingerprints
from lever_lm.rl.journal import Journal, shard_file_name
from lever_lm.rl.output import collect_journal_index, write_final_json, write_meta
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.base import Generation, resolve_device
from lever_lm.vqa.metric import MODES, prepare_answers, score_prediction
from lever_lm.vqa.prompts import FewShotPrompt, Shot

log = logging.getLogger(__name__)

PROPOSAL_BLOCK = 32
EVAL_MODE_NAME = "vqaEval"
EXPORT_HINT = (
    "python -m lever_lm.models.v3.export_embeddings --clip_model <CLIP dir> --output_dir <dir> "
    "(with the same --train_* / --config / --dataset as here)"
)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything the command line (or a stage) decided; paths not yet checked."""

    sft_ckpt: Path
    beam_data: Path
    output_path: Path
    query_emb: Path
    cand_emb: Path
    dataset: DatasetPaths
    val_ques_path: Path | None = None
    val_ann_path: Path | None = None
    vqa_model: str = "qwen2.5_vl_3B"
    vqa_model_path: str | None = None
    config: dict = field(default_factory=dict)
    proposal: ProposalSettings = ProposalSettings()
    shot_num: int | None = None  # None: from the beam data (overrides proposal.shot_num)
    eval_mode: str = "always"
    device: str = "cuda:0"
    batch_size: int | None = None
    num_shards: int = 1
    shard_id: int = 0
    limit: int | None = None
    journal_dir: Path | None = None
    merge_only: bool = False
    progress: bool = True

    def journal_root(self) -> Path:
        return self.journal_dir or self.output_path.with_name(self.output_path.name + ".journal")


@dataclass
class Inputs:
    """The checked inputs of a run."""

    dataset: VQADataset
    beam: BeamData
    query_emb: torch.Tensor
    cand_emb: torch.Tensor
    pointer: PointerSelectorV2
    proposal: ProposalSettings
    queries: list[int]  # beam-data order, after --limit
    scoring_answers: dict[int, tuple[str, ...]]  # query row -> the human answers that score it


@dataclass
class RunSummary:
    """What a run did, for the log, the meta sidecar and the tests."""

    fingerprint: str
    journal: Path
    queries_total: int
    queries_done_before: int
    queries_processed: int = 0
    candidates_processed: int = 0
    seconds: float = 0.0
    final: dict | None = None
    output_path: Path | None = None


def run_generation(request: GenerationRequest) -> RunSummary:
    """Run (or resume) one shard of the job; write the final JSON when the run is unsharded."""
    started = time.time()
    _check_request(request)
    inputs = load_inputs(request)
    settings = fingerprints.run_settings(request, inputs.proposal, PROPOSAL_BLOCK)
    fingerprint = fingerprints.fingerprint_of(settings)
    directory = request.journal_root() / fingerprint
    if request.merge_only:
        return merge_shards(request, inputs, settings, directory, started)

    shard_queries = shard_of(inputs.queries, request.num_shards, request.shard_id)
    with Journal.open(directory, request.shard_id, request.num_shards, settings=settings) as journal:
        done = journal.done() & set(shard_queries)
        summary = RunSummary(fingerprint, journal.path, len(shard_queries), len(done))
        log.info("journal %s: %d of %d queries already done", journal.path, len(done), len(shard_queries))
        if len(done) < len(shard_queries):
            backend = load_backend(
                request.vqa_model,
                model_path=request.vqa_model_path,
                device=request.device,
                config=request.config,
                batch_size=request.batch_size,
            )
            process_queries(request, inputs, backend, journal, shard_queries, summary)
    summary.seconds = time.time() - started
    if request.num_shards == 1:
        finish(request, inputs, fingerprint, [summary.journal], summary, settings)
    else:
        log.info(
            "shard %d of %d done (%s); when every shard is done, merge with the same flags plus --merge",
            request.shard_id,
            request.num_shards,
            summary.journal,
        )
    return summary


def merge_shards(request: GenerationRequest, inputs: Inputs, settings: dict, directory: Path, started: float):
    """Combine the journals of shards 0..N-1 into the final JSON (none missing, none twice)."""
    journals = [directory / shard_file_name(i, request.num_shards) for i in range(request.num_shards)]
    summary = RunSummary(directory.name, directory, len(inputs.queries), len(inputs.queries))
    summary.seconds = time.time() - started
    finish(request, inputs, directory.name, journals, summary, settings)
    return summary


def finish(request, inputs: Inputs, fingerprint: str, journals: list[Path], summary: RunSummary, settings: dict):
    index = collect_journal_index(journals)
    final = write_final_json(request.output_path, inputs.queries, index)
    summary.final, summary.output_path = final, request.output_path
    write_meta(request.output_path, run_meta(request, settings, fingerprint, journals, summary))
    log.info("%s", format_summary(final, summary.seconds))


# -- inputs ---------------------------------------------------------------------------------------


def _check_request(request: GenerationRequest) -> None:
    if request.num_shards < 1 or not 0 <= request.shard_id < request.num_shards:
        raise InputError(None, f"--shard_id must be in 0..{request.num_shards - 1} (got {request.shard_id})")
    if request.limit is not None and request.limit < 1:
        raise InputError(None, f"--limit must be >= 1 (got {request.limit})")
    if (request.val_ques_path is None) != (request.val_ann_path is None):
        raise InputError(None, "give both --val_ques_path and --val_ann_path, or neither")
    if request.eval_mode not in MODES:
        raise InputError(None, f"--eval_mode must be one of {', '.join(MODES)}")
    if not request.merge_only:
        resolve_device(request.device)  # a missing GPU is reported before anything is written


def load_inputs(request: GenerationRequest) -> Inputs:
    """Read and cross-check every input; every problem is an InputError naming its file."""
    paths = request.dataset
    dataset = VQADataset.load(paths.train_ques_path, paths.train_ann_path, paths.train_image_root)
    beam = load_beam_data(request.beam_data, len(dataset))
    for path in (request.query_emb, request.cand_emb):
        if not Path(path).is_file():
            raise InputError(path, f"embeddings file not found; export them first: {EXPORT_HINT}")
    query_emb = load_embeddings(request.query_emb, len(dataset))
    cand_emb = load_embeddings(request.cand_emb, len(dataset))
    check_embedding_pair(query_emb, cand_emb, request.query_emb, request.cand_emb)
    pointer = load_pointer_checkpoint(request.sft_ckpt)
    if pointer.input_dim != cand_emb.shape[1]:
        raise InputError(
            request.sft_ckpt,
            f"pointer input dim {pointer.input_dim} does not match the embeddings' d = {cand_emb.shape[1]} "
            f"({request.cand_emb})",
        )
    proposal = dataclasses.replace(request.proposal, shot_num=request.shot_num or beam.shot_num)
    queries = beam.query_ids[: request.limit] if request.limit else list(beam.query_ids)
    answers = scoring_answers(request, dataset, queries)
    return Inputs(dataset, beam, query_emb, cand_emb, pointer.eval(), proposal, queries, answers)


def scoring_answers(request: GenerationRequest, dataset: VQADataset, queries: list[int]) -> dict[int, tuple[str, ...]]:
    """The human answers that score each query: from --val_ann_path when it holds the question
    (SPEC §2 note), else from the training annotations the data set was read with."""
    val = {}
    if request.val_ann_path is not None:
        _check_questions_file(request.val_ques_path)  # questions themselves come from the data set
        val = load_annotations(request.val_ann_path)
    answers, from_train = {}, 0
    for query in queries:
        item = dataset[query]
        record = val.get(item.question_id)
        if record is not None:
            answers[query] = tuple(str(a["answer"]) for a in record["answers"])
        else:
            answers[query] = item.answers
            from_train += 1
        if not answers[query]:
            raise InputError(request.val_ann_path or request.dataset.train_ann_path, f"no answers for question {item.question_id}")
    if val and from_train:
        log.info("%d of %d queries are not in %s; scored with the training annotations", from_train, len(queries), request.val_ann_path)
    return answers


def _check_questions_file(path: Path) -> None:
    if not isinstance(read_json_object(Path(path)).get("questions"), list):
        raise InputError(path, "missing the 'questions' list (is this an official VQA questions file?)")


def shard_of(queries: Sequence[int], num_shards: int, shard_id: int) -> list[int]:
    """The shard's queries: blocks of PROPOSAL_BLOCK dealt round-robin, so shards are whole blocks."""
    blocks = [queries[i : i + PROPOSAL_BLOCK] for i in range(0, len(queries), PROPOSAL_BLOCK)]
    return [q for block in blocks[shard_id::num_shards] for q in block]


# -- the loop -------------------------------------------------------------------------------------


def process_queries(request, inputs: Inputs, backend, journal: Journal, shard_queries: list[int], summary: RunSummary):
    """Propose, score and journal every query of the shard that is not journaled yet."""
    proposer = Proposer(
        inputs.pointer,
        inputs.query_emb,
        inputs.cand_emb,
        inputs.proposal,
        image_ids=inputs.dataset.image_ids,
        device=request.device,  # already checked to exist
        query_batch_size=PROPOSAL_BLOCK,
    )
    done = journal.done()
    todo_total = sum(1 for q in shard_queries if q not in done)
    started = time.time()
    bar = tqdm(total=todo_total, unit="query", disable=not request.progress, dynamic_ncols=True)
    for block in _blocks(shard_queries):
        todo = [q for q in block if q not in done]
        if not todo:
            continue
        proposals = {p.query_idx: p for p in proposer.propose(block)}
        backend.prefetch([build_prompt(inputs.dataset, q, c.pointer) for q in todo for c in proposals[q].candidates])
        for query_idx, entry, stats in score_block(inputs, backend, [proposals[q] for q in todo], request.eval_mode):
            journal.append(query_idx, entry, stats)
            summary.queries_processed += 1
            summary.candidates_processed += len(entry["pointer_candidates"])
            elapsed = max(time.time() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(cand_per_s=f"{summary.candidates_processed / elapsed:.1f}")
    bar.close()


def _blocks(shard_queries: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(shard_queries), PROPOSAL_BLOCK):
        yield shard_queries[i : i + PROPOSAL_BLOCK]


def score_block(inputs: Inputs, backend, proposals: list[QueryProposals], eval_mode: str):
    """Yield (query_idx, entry, stats) per query, in order, as soon as its candidates are scored.

    Candidates of all the block's queries go to the backend together, in chunks of its batch
    size, so a generate call mixes queries (the VQA model is the cost; batches stay full).
    """
    flat: list[tuple[int, Candidate]] = [(i, c) for i, p in enumerate(proposals) for c in p.candidates]
    remaining = [len(p.candidates) for p in proposals]
    generations: list[list[Generation | None]] = [[None] * len(p.candidates) for p in proposals]
    positions = [j for p in proposals for j in range(len(p.candidates))]
    chunk = backend.settings.batch_size
    next_to_yield = 0
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        prompts = [build_prompt(inputs.dataset, proposals[i].query_idx, c.pointer) for i, c in part]
        for (i, _), position, generation in zip(part, positions[start : start + chunk], backend.generate(prompts)):
            generations[i][position] = generation
            remaining[i] -= 1
        while next_to_yield < len(proposals) and remaining[next_to_yield] == 0:
            yield _finished(inputs, proposals[next_to_yield], generations[next_to_yield], eval_mode)
            next_to_yield += 1
    while next_to_yield < len(proposals):  # queries without candidates (tiny pools)
        yield _finished(inputs, proposals[next_to_yield], generations[next_to_yield], eval_mode)
        next_to_yield += 1


def build_prompt(dataset: VQADataset, query_idx: int, pointer: Sequence[int]) -> FewShotPrompt:
    """The few-shot prompt of one candidate: ICDs in pointer order, then the query."""
    shots = tuple(Shot(dataset.image_path(i), dataset[i].question, dataset[i].icd_answer) for i in pointer)
    return FewShotPrompt(shots=shots, query=Shot(dataset.image_path(query_idx), dataset[query_idx].question))


def _finished(inputs: Inputs, proposals: QueryProposals, generations: list, eval_mode: str):
    query_idx = proposals.query_idx
    item = inputs.dataset[query_idx]
    gt = inputs.scoring_answers[query_idx]
    prepared = prepare_answers(list(gt), mode=eval_mode)
    candidates = [candidate_record(c, g, prepared) for c, g in zip(proposals.candidates, generations)]
    entry = {
        "query": {
            "query_id": query_idx,
            "question_id": item.question_id,
            "image_id": item.image_id,
            "question": item.question,
            "gt_answers_raw": list(gt),
        },
        "pointer_candidates": candidates,
    }
    return query_idx, entry, {"duplicates_dropped": dict(proposals.duplicates_dropped)}


def candidate_record(candidate: Candidate, generation: Generation, prepared) -> dict:
    """One `pointer_candidates` entry (SPEC §5); a failed evaluation scores 0 and says why."""
    failed = generation.error is not None
    accuracy = 0.0 if failed else score_prediction(generation.answer, prepared)
    record = {
        "pointer": list(candidate.pointer),
        "gen_method": candidate.gen_method,
        "beam_rank": candidate.beam_rank,
        "beam_score": candidate.beam_score,
        "logprob_score": candidate.logprob_score,
        "temperature": candidate.temperature,
        "vqa_raw_generation": generation.raw,
        "vqa_pred_answer": generation.answer,
        "vqa_correct": 1 if accuracy > 0 else 0,
        "vqa_acc_score": accuracy,
        "vqa_eval_mode": EVAL_MODE_NAME,
        "eval_failed": failed,
    }
    if failed:
        record["eval_error"] = generation.error
    return record


# -- reporting ------------------------------------------------------------------------------------


def format_summary(final: dict, seconds: float) -> str:
    by_method = ", ".join(
        f"{m}: {v['accuracy']:.3f} ({v['candidates']})" for m, v in sorted(final.get("by_method", {}).items())
    )
    return (
        f"wrote {final['queries']} queries, {final['candidates']} candidates "
        f"({final['failed']} failed evaluations) in {seconds:.1f}s; accuracy by method: {by_method or '-'}"
    )


def run_meta(request, settings: dict, fingerprint: str, journals: list[Path], summary: RunSummary) -> dict:
    import transformers

    import lever_lm

    return {
        "fingerprint": fingerprint,
        "settings": settings,
        "journals": [str(p) for p in journals],
        "counts": summary.final,
        "timing": {
            "seconds": round(summary.seconds, 3),
            "queries_processed_this_run": summary.queries_processed,
            "candidates_processed_this_run": summary.candidates_processed,
        },
        "run": {
            "device": request.device,
            "batch_size": request.batch_size,
            "num_shards": request.num_shards,
            "limit": request.limit,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "versions": {
            "lever_lm": getattr(lever_lm, "__version__", "0.1.0"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "request": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(request).items() if k != "config"},
    }
