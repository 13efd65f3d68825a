"""Beam data by InfoScore: the lineage's data generation as one more job of the RL generator's machinery.

`run_beam_data(request)` is the job behind `python -m lever_lm.infoscore.cli` (stage `beam_data`):

1. read and check the inputs: the training split and the sampler cache, whose keys are the
   queries (in file order) and whose values their pools (`sample_pools` writes one);
2. fix the fingerprint: the search settings, the answer rule, the VQA model (content, prompt,
   numerics), the inputs' and images' content, and the code that computes a result;
3. run every block of queries that holds a query still to do, on the local or the Ray engine,
   journaling each finished query (`lever_lm.rl.generate.run_plan`: the RL data's journal,
   pins, shards, resume and engines);
4. write the beam JSON from the journal (docs/formats.md §3.2; `lever_lm.infoscore.records`).

Each query is searched on its own (`BeamSearcher`): its prompts go to the backend step by step,
every expansion of a step in one call, cut into batches from that query's prompts alone. A
query's result therefore depends on nothing but the query, its pool, the settings and the two
things that move float results in their last bits: the batch size (a prompt's batch-mates and
padding; the shared prefix a batch runs once) and, on a CPU, the torch thread count. The journal
pins both when a run starts (`journal.Pins`, as for the RL data) and every resume scores with
them, on either engine: a resumed or limited run writes the bytes an uninterrupted run writes. A
fresh Ray run on a CPU scores with one torch thread per worker (it equals a local run with one).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.vqa import VQADataset
from lever_lm.digests import file_digest, files_digest
from lever_lm.errors import InputError
from lever_lm.infoscore.probability import AnswerProbability
from lever_lm.infoscore.records import BeamRules, BeamTotals, beam_entry, beam_stats, describe_beam_data
from lever_lm.infoscore.search import SearchSettings, info_score_search
from lever_lm.models.v3.pools import read_sampler_cache
from lever_lm.rl import fingerprints
from lever_lm.rl.blocks import QueryResult
from lever_lm.rl.generate import (
    RunPlan,
    RunSummary,
    library_versions,
    request_record,
    run_info,
    run_plan,
    run_timing,
)
from lever_lm.rl.job import JobType
from lever_lm.rl.output import check_output_names
from lever_lm.rl.request import PROPOSAL_BLOCK, JobOptions, check_job_options
from lever_lm.vqa.backends import describe_settings
from lever_lm.vqa.backends.base import VQABackend
from lever_lm.vqa.prompts import build_prompt

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ANSWER_RULE = "icd_answer"  # y: the answer the query shows as an ICD (docs/formats.md §3.1)
# The project code whose edits change what a beam data run computes.
RESULT_CODE = ("data", "vqa", "infoscore")
BLOCK_SIZE = (
    PROPOSAL_BLOCK  # queries per block: the unit of sharding and of Ray scheduling (results do not depend on it)
)


@dataclass(frozen=True)
class BeamDataRequest(JobOptions):
    """What the command line (or the stage) asked for; paths not yet checked."""

    sampler_cache: Path
    output_path: Path
    dataset: DatasetPaths
    search: SearchSettings = SearchSettings()


@dataclass
class BeamInputs:
    """The checked inputs of a run: the training split, every query's pool, the queries."""

    dataset: VQADataset
    pools: dict[int, tuple[int, ...]]
    all_queries: list[int]  # the sampler cache's keys, in file order
    queries: list[int]  # the first --limit of them (all without --limit)


def run_beam_data(request: BeamDataRequest, backend: VQABackend | None = None) -> RunSummary:
    """Run (or resume) one shard; write the beam JSON when unsharded (or with --merge).

    `backend`: an already loaded VQA backend (tests, benchmarks); by default the request's model is
    loaded, and only when there is work to do.
    """
    check_output_names(request.output_path)
    check_job_options(request)
    return run_plan(plan_beam_data(request), backend)


def plan_beam_data(request: BeamDataRequest) -> RunPlan:
    inputs = load_beam_inputs(request)
    settings = run_settings(request, inputs)
    rules = BeamRules(request.search.shot_num, len(inputs.dataset), request.search.beam_size)
    job = JobType(
        name=BeamRules.JOB,
        runner=SearcherSettings(request.search),
        new_totals=BeamTotals,
        describe=describe_beam_data,
        unit="prompts",
        code=RESULT_CODE,
        meta=beam_meta,
    )
    return RunPlan(request, inputs, settings, fingerprints.fingerprint(settings), BLOCK_SIZE, rules, job)


def load_beam_inputs(request: BeamDataRequest) -> BeamInputs:
    """The training split and the sampler cache, cross-checked; every problem an InputError naming its file."""
    dataset = request.dataset.load()
    pools = read_sampler_cache(request.sampler_cache, len(dataset))
    queries = list(pools)
    size = len(pools[queries[0]])
    if size < request.search.shot_num:
        raise InputError(
            request.sampler_cache,
            f"the pools hold {size} rows, fewer than --shot_num {request.search.shot_num}: a sequence needs that many",
        )
    limited = queries[: request.limit] if request.limit else queries
    return BeamInputs(dataset, pools, queries, limited)


def run_settings(request: BeamDataRequest, inputs: BeamInputs) -> dict:
    """The settings dict whose hash names the journal directory (see `lever_lm.rl.fingerprints`): the
    search, the answer rule, the VQA model (content, prompt, image processing, numerics; not its
    decoding settings, which no likelihood depends on), the inputs' and images' content, the code."""
    paths = request.dataset
    files = {
        "sampler_cache": request.sampler_cache,
        "train_questions": paths.train_ques_path,
        "train_annotations": paths.train_ann_path,
    }
    vqa = describe_settings(
        request.vqa_model, model_path=request.vqa_model_path, config=request.config, device=request.device
    )
    vqa.pop("generation", None)  # decoding settings shape answers, not teacher-forced likelihoods
    return {
        "format_version": FORMAT_VERSION,
        "job": BeamRules.JOB,
        "search": dataclasses.asdict(request.search),
        "answer": ANSWER_RULE,
        "vqa": vqa,
        "inputs": {name: file_digest(path) for name, path in files.items()},
        "images": files_digest(inputs.dataset.image_names(), paths.train_image_root),
        "code": fingerprints.code_digest(RESULT_CODE),
    }


def beam_meta(plan: RunPlan, journals: list[Path], summary: RunSummary, data_sha256: str) -> dict:
    """The beam data's `<output>.meta.json`: the RL data sidecar's top-level keys (`lever_lm.rl.meta`),
    with this job's settings and counts (`BeamTotals`); nothing reads it back but people and tests."""
    return {
        "fingerprint": plan.fingerprint,
        "data_sha256": data_sha256,
        "settings": plan.settings,
        "journals": [str(p) for p in journals],
        "counts": summary.final,
        "run": dataclasses.asdict(run_info(plan.request, summary)),
        "timing": run_timing(plan, summary),
        "engine": summary.engine,
        "versions": library_versions(),
        "request": request_record(plan.request),
    }


@dataclass(frozen=True)
class SearcherSettings:
    """The beam data job's runner factory (`job.RunnerFactory`): what a Ray worker needs to build its searcher."""

    search: SearchSettings

    def build(self, inputs: BeamInputs, backend: VQABackend, device: str) -> BeamSearcher:
        return BeamSearcher(inputs, backend, self.search)


class BeamSearcher:
    """The beam data job's block runner (`job.BlockRunner`): one query after another, each searched
    over its own pool with InfoScore through the VQA backend."""

    def __init__(self, inputs: BeamInputs, backend: VQABackend, settings: SearchSettings):
        self.inputs, self.backend, self.settings = inputs, backend, settings

    def run(self, block: Sequence[int], todo: set[int]) -> Iterator[QueryResult]:
        queries = [q for q in block if q in todo]
        dataset = self.inputs.dataset
        # the images of the block's first step (every pool item, every query) prepared ahead
        self.backend.prefetch([build_prompt(dataset, q, [c]) for q in queries for c in self.inputs.pools[q]])
        for query in queries:
            yield self.search(query)

    def search(self, query: int) -> QueryResult:
        probability = AnswerProbability(self.backend, self.inputs.dataset, query)
        result = info_score_search(probability, self.inputs.pools[query], self.settings)
        stats = beam_stats(result, probability.answer, probability.first_failure)
        return QueryResult(query, beam_entry(query, result), stats, work=result.prompts)
