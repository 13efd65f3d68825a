"""RL data generation: inputs -> proposals -> batched VQA scoring -> journal -> final JSON.

`run_generation(request)` is the whole job behind `python -m lever_lm.models.v3.generate_rl_data`:

1. check the request and read every input (data set, beam data, embeddings, SFT checkpoint,
   scoring annotations) -- a bad one stops the run here, before any model is loaded;
2. open the journal of this run's fingerprint and shard (a second writer is refused; every line
   read back is checked);
3. load the VQA model and let the engine score every block that holds a query still to do --
   not journaled yet, or journaled with failed evaluations, which are retried once per run;
   each finished query is journaled at once (`lever_lm.rl.blocks`, `lever_lm.rl.engines`);
4. write the final JSON from the journal (single run) or leave the shard journal for a merge.

A resumed, limited or sharded run writes exactly the bytes a single uninterrupted run writes:
blocks are proposed whole and their VQA batches are cut from the whole block. What else moves the
bytes -- the VQA batch size and, on a CPU, the torch thread count -- is pinned in the journal's
header by the run that starts it (`journal.Pins`), and every resume scores with the same, whatever
its own --batch_size, free GPU memory or engine.

Steps 2-4 serve any per-query job (`run_plan`): the InfoScore beam search (`lever_lm.infoscore`)
plans its run with its own `JobType` and runs it here, with the same journal, pins, shards and engines.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import lever_lm
from lever_lm.rl import fingerprints
from lever_lm.rl.blocks import QueryResult, ScorerSettings, shard_of
from lever_lm.rl.engines.local import run_local
from lever_lm.rl.inputs import load_inputs
from lever_lm.rl.job import JobType
from lever_lm.rl.journal import Journal, JournalRules, JournalSpec, Pins, read_pins, shard_file_name
from lever_lm.rl.meta import ModelSource, RunCounts, RunInfo, RunMeta, RunSettings, write_meta
from lever_lm.rl.output import check_output_names, collect_journal_index, write_final_json
from lever_lm.rl.records import MethodTotals, RecordRules
from lever_lm.rl.request import GenerationRequest, JobOptions, check_request
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.base import VQABackend

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did, for the log, the meta sidecar and the tests."""

    fingerprint: str
    journal: Path
    queries_total: int
    queries_done_before: int
    queries_retried: int = 0
    queries_processed: int = 0
    candidates_processed: int = 0  # the job's unit of work: candidates (RL data), prompts (beam data)
    batch_size: int | None = None
    torch_threads: int | None = None  # on a CPU
    seconds: float = 0.0
    final: dict | None = None
    output_path: Path | None = None
    engine: dict | None = None  # the Ray engine's timings and each worker's counts and timings


@dataclass(frozen=True)
class RunPlan:
    """A run's identity and layout, fixed before any journal is opened. `job` says what kind of
    per-query job it is (`lever_lm.rl.job`): this module runs any of them; `inputs` has the job's
    `all_queries` and the `queries` (--limit) it writes."""

    request: JobOptions
    inputs: Any
    settings: dict
    fingerprint: str
    block_size: int  # queries per block: the unit of sharding and of the engines' scheduling
    rules: JournalRules
    job: JobType

    def journal_spec(self, shard_id: int) -> JournalSpec:
        n = self.request.num_shards
        queries = tuple(shard_of(self.inputs.all_queries, n, shard_id, self.block_size))
        return JournalSpec(self.settings, queries, self.rules, shard_id, n)

    def journal_path(self, shard_id: int) -> Path:
        directory = self.request.journal_root() / self.fingerprint
        return directory / shard_file_name(shard_id, self.request.num_shards)


def run_generation(request: GenerationRequest, backend: VQABackend | None = None) -> RunSummary:
    """Run (or resume) one shard of the job; write the final JSON when the run is unsharded.

    `backend`: an already loaded VQA backend (tests pass a fake one); by default the request's
    model is loaded, and only when there is work to do.
    """
    check_output_names(request.output_path)
    check_request(request)
    return run_plan(plan_run(request), backend)


def run_plan(plan: RunPlan, backend: VQABackend | None = None) -> RunSummary:
    """Run (or resume) one shard of a planned job; write the final JSON when the run is unsharded."""
    started = time.time()
    request = plan.request
    if request.merge_only:
        summary = RunSummary(plan.fingerprint, plan.journal_path(0).parent, len(plan.inputs.queries), 0)
        finish(plan, list(range(request.num_shards)), summary, started)
        return summary
    summary = run_shard(plan, backend)
    if request.num_shards == 1:
        finish(plan, [0], summary, started)
    else:
        summary.seconds = time.time() - started
        log.info(
            "shard %d of %d done (%s); when every shard is done, merge with the same flags plus --merge",
            request.shard_id,
            request.num_shards,
            summary.journal,
        )
    return summary


def plan_run(request: GenerationRequest) -> RunPlan:
    """Read the inputs and fix the run's fingerprint."""
    inputs = load_inputs(request)
    settings = fingerprints.run_settings(request, inputs)
    rules = RecordRules(inputs.proposal.shot_num, len(inputs.dataset), inputs.pools.size if inputs.pools else None)
    block_size = request.proposal_block
    job = JobType(
        name="rl_data",
        runner=ScorerSettings(request.eval_mode, block_size, request.gt_prob),
        new_totals=MethodTotals,
        describe=format_summary,
        unit="candidates",
        code=fingerprints.RESULT_CODE,
        meta=run_meta,
    )
    return RunPlan(request, inputs, settings, fingerprints.fingerprint(settings), block_size, rules, job)


def run_shard(plan: RunPlan, backend: VQABackend | None = None) -> RunSummary:
    """Score every query of the request's shard that is not final in its journal yet."""
    request, inputs = plan.request, plan.inputs
    spec = plan.journal_spec(request.shard_id)
    wanted = set(inputs.queries)  # --limit keeps the first N queries
    engine = _connect_engine(request)  # a bad Ray address or cluster stops the run before anything is written
    with engine, Journal.open(plan.journal_path(request.shard_id).parent, spec) as journal:
        done, retry = journal.done() & wanted, journal.incomplete() & wanted
        total = sum(1 for q in spec.queries if q in wanted)
        summary = RunSummary(plan.fingerprint, journal.path, total, len(done), queries_retried=len(retry))
        _log_journal_state(plan, journal, summary)
        todo = {q for q in spec.queries if q in wanted} - done

        def journal_result(result: QueryResult) -> None:
            journal.append(result.query_idx, result.entry, result.stats)
            summary.queries_processed += 1
            summary.candidates_processed += result.work
            if result.query_error:
                log.warning("query %d is left out of the output: %s", result.query_idx, result.query_error)

        if todo and request.engine == "ray":
            summary.engine = engine.run(
                inputs,
                plan.settings,
                spec.queries,
                todo,
                plan.block_size,
                journal_result,
                plan.job,
                batch_size=scoring_batch_size(request, journal),
                torch_threads=journal.pins.torch_threads if journal.pins else None,
                pin=journal.pin,
            )
        elif todo:
            _score_locally(plan, journal, todo, journal_result, backend)
        if journal.pins is not None:
            summary.batch_size, summary.torch_threads = journal.pins.batch_size, journal.pins.torch_threads
    return summary


def _score_locally(
    plan: RunPlan,
    journal: Journal,
    todo: set[int],
    on_result: Callable[[QueryResult], None],
    backend: VQABackend | None,
) -> None:
    """Run the shard's blocks in this process, with the journal's pins (or pin what this run uses)."""
    request, spec = plan.request, journal.spec
    with torch_threads(journal.pins.torch_threads if journal.pins else None):
        backend = backend or load_backend(
            request.vqa_model,
            model_path=request.vqa_model_path,
            device=request.device,
            config=request.config,
            batch_size=scoring_batch_size(request, journal),
        )
        journal.pin(Pins(backend.batch_size, torch.get_num_threads() if _on_cpu(request.device) else None))
        runner = plan.job.runner.build(plan.inputs, backend, request.device)
        run_local(runner, spec.queries, todo, plan.block_size, on_result, progress=request.progress, unit=plan.job.unit)


def scoring_batch_size(request: JobOptions, journal: Journal) -> int | None:
    """The batch size to score with: the journal's pinned one when it has one (a different --batch_size
    is overridden, with a warning: a resume must cut the batches the first run cut), else the request's
    (None: the backend decides, from the GPU's free memory)."""
    pins = journal.pins
    if pins is None:
        return request.batch_size
    if request.batch_size is not None and request.batch_size != pins.batch_size:
        log.warning(
            "--batch_size %d is not used: %s was started with %s, and a resume keeps them so that the output's "
            "bytes do not change (delete the journal to start over with --batch_size %d)",
            request.batch_size,
            journal.path,
            pins.describe(),
            request.batch_size,
        )
    else:
        log.info("scoring with the journal's %s", pins.describe())
    return pins.batch_size


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside the block (None: left as they are), restored after."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        log.info("using %d torch threads, as the journal's first run did (this process had %d)", threads, before)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _on_cpu(device: str) -> bool:
    return torch.device(device).type == "cpu"


def _connect_engine(request: JobOptions) -> contextlib.AbstractContextManager:
    """The Ray engine, connected to its cluster; nothing to open for the local engine (which never imports ray)."""
    if request.engine != "ray":
        return contextlib.nullcontext()
    from lever_lm.rl.engines.ray import RayEngine

    return RayEngine(request)


def _log_journal_state(plan: RunPlan, journal: Journal, summary: RunSummary) -> None:
    log.info(
        "journal %s: %d of %d queries already done",
        journal.path,
        summary.queries_done_before,
        summary.queries_total,
    )
    if summary.queries_done_before:
        log.info("reusing results that match %s", fingerprints.matched_summary(plan.settings))
    if summary.queries_retried:
        log.info("retrying %d queries whose evaluations failed in an earlier run", summary.queries_retried)


def finish(plan: RunPlan, shard_ids: list[int], summary: RunSummary, started: float) -> None:
    """Write the final JSON from the shard journals, and the meta sidecar."""
    journals = [(plan.journal_path(i), plan.journal_spec(i)) for i in shard_ids]
    journals = [(path, spec) for path, spec in journals if spec.queries]  # more shards than blocks: some are empty
    index = collect_journal_index(journals)
    if len(shard_ids) > 1:
        _note_shard_pins([read_pins(path) for path, _ in journals], summary)
    final = write_final_json(plan.request.output_path, plan.inputs.queries, index, plan.job.new_totals())
    summary.seconds = time.time() - started
    summary.final, summary.output_path = final.as_dict(), plan.request.output_path
    write_meta(plan.request.output_path, plan.job.meta(plan, [path for path, _ in journals], summary, final.sha256))
    log.info("%s", plan.job.describe(summary.final, summary.seconds))
    if final.unscorable:
        log.warning(
            "%d queries left out because their own image cannot be read (listed in the meta file); "
            "fix the images and rerun to score them",
            len(final.unscorable),
        )


def _note_shard_pins(pins: list[Pins | None], summary: RunSummary) -> None:
    """The merged file's batch size and threads when every shard had the same; a warning otherwise."""
    if len(set(pins)) == 1 and pins[0] is not None:
        summary.batch_size, summary.torch_threads = pins[0].batch_size, pins[0].torch_threads
        return
    described = ", ".join(f"shard {i}: {p.describe() if p else '-'}" for i, p in enumerate(pins))
    log.warning(
        "the shards were scored with different batch sizes or thread counts (%s): each shard's bytes are "
        "its own, and the merged file equals no single run's in the last bits; give every shard the same "
        "--batch_size to avoid this",
        described,
    )


# -- reporting ------------------------------------------------------------------------------------


def format_summary(final: dict, seconds: float) -> str:
    by_method = ", ".join(
        f"{m}: {v['accuracy']:.3f} ({v['candidates']})" for m, v in sorted(final.get("by_method", {}).items())
    )
    return (
        f"wrote {final['queries']} queries, {final['candidates']} candidates "
        f"({final['failed']} failed evaluations) in {seconds:.1f}s; accuracy by method: {by_method or '-'}"
    )


def run_meta(plan: RunPlan, journals: list[Path], summary: RunSummary, data_sha256: str) -> RunMeta:
    """The RL data's meta sidecar of a finished run (`lever_lm.rl.meta`)."""
    request = plan.request
    return RunMeta(
        fingerprint=plan.fingerprint,
        data_sha256=data_sha256,
        settings=RunSettings.parse(plan.settings),
        journals=tuple(str(p) for p in journals),
        counts=RunCounts.parse(summary.final),
        run=run_info(request, summary),
        timing=run_timing(plan, summary),
        engine=summary.engine,
        versions=library_versions(),
        request=request_record(request),
        model=ModelSource(request.vqa_model, request.vqa_model_path, _str_or_none(request.config_path)),
    )


def run_info(request: JobOptions, summary: RunSummary) -> RunInfo:
    """How a run was done (every job's sidecar holds it): device, pinned batch size and threads, layout."""
    return RunInfo(
        device=request.device,
        batch_size=summary.batch_size,
        torch_threads=summary.torch_threads,
        num_shards=request.num_shards,
        limit=request.limit,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def run_timing(plan: RunPlan, summary: RunSummary) -> dict:
    return {
        "seconds": round(summary.seconds, 3),
        "queries_processed_this_run": summary.queries_processed,
        f"{plan.job.unit}_processed_this_run": summary.candidates_processed,
        "queries_retried_this_run": summary.queries_retried,
    }


def library_versions() -> dict:
    import transformers

    return {
        "lever_lm": lever_lm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def request_record(request: JobOptions) -> dict:
    """The request as the sidecar records it (paths as strings; the config is in the settings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(request).items() if k != "config"}


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)
