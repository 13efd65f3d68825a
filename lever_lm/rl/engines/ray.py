"""The Ray engine: proposal blocks handed to Ray actors as they free up; the driver journals every result.

Each worker is a Ray actor with one CPU and `--gpus_per_worker` GPUs (fractions pack small models
on one GPU). It loads the VQA backend once and builds the job's block runner (a `BlockScorer` for
RL data, a `BeamSearcher` for InfoScore beam data; `lever_lm.rl.job`) from the run's inputs, which
the driver loaded once and put in Ray's object store: no worker reads the annotations, the
embeddings or the SFT checkpoint from disk, and the workers of a node share one copy of the
embeddings and the data set's columns (`for_object_store`). The images and the VQA model are read
where the worker runs, so every node needs them at the same paths.

The driver hands each block that holds a query to do to whichever worker is free. The worker
runs it exactly as the local engine does (the runner's `run`), in a thread, and the driver keeps
one call open per worker that returns the queries finished so far; it journals each (append +
fsync) as it arrives, in whatever order the blocks finish. The final JSON is written in beam-data
order from the journal, and a killed driver loses only the unjournaled part of the blocks in flight:
a rerun resumes from the journal.

Every worker scores with one batch size and one torch thread count, the journal's pins when it has
them (`journal.Pins`). A new journal pins what the first worker to load uses; when the batch size
is left to the free GPU memory, that first worker loads alone and the others then load with its
batch size. So the output is byte-identical to the local engine's at the same batch size and thread
count. On a CPU a fresh Ray run uses one thread per worker: it equals a local run with one torch
thread, not a local run with the machine's default; a resume keeps whatever the journal pinned.

A lost worker (killed, out of host memory, its node gone) costs only the rest of its block: the
block goes back to the front of the queue without the queries already journaled, and a replacement
worker starts. A block that loses MAX_BLOCK_FAILURES workers stops the run (`WorkersLost`, naming
the block and the last cause). Any other error raised in a worker stops the run at once with that
very error: an `InputError` (a model that cannot be loaded there), a `GenerationAborted` (an
accelerator failure), or a bug. Plain actor calls, not streaming generators, so that Ray Client
(`ray://`) drivers work too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import re
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import torch
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from lever_lm.errors import InputError
from lever_lm.process import apply_process_settings
from lever_lm.rl.blocks import QueryResult, blocks_of
from lever_lm.rl.engines.progress import Progress
from lever_lm.rl.inputs import Inputs
from lever_lm.rl.job import BlockRunner, JobType, RunnerFactory
from lever_lm.rl.journal import Pins
from lever_lm.rl.request import JobOptions
from lever_lm.vqa.backends import load_backend
from lever_lm.vqa.backends.base import GenerationAborted

log = logging.getLogger(__name__)

MAX_BLOCK_FAILURES = 3  # lost workers one block may cost before the run stops
CPUS_PER_WORKER = 1  # and one torch thread, unless the journal pinned more: a worker's CPU work is feeding its GPU
WAIT_NOTE_SECONDS = 60.0  # how often to say that no worker is running yet
BLOCK_DONE = "block done"  # what a worker's scoring thread says after the block's last query
# A worker process that is gone, for whatever reason: its block is retried on another worker.
LOST_WORKER = (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ObjectLostError)


class WorkersLost(GenerationAborted):
    """Ray workers keep dying: one block lost MAX_BLOCK_FAILURES of them, or as many died while
    loading. The journal keeps every finished query; a rerun resumes once the cause is fixed."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs besides the inputs: how to load the VQA backend and build its block runner."""

    vqa_model: str
    model_path: str | None
    config: dict
    batch_size: int | None
    runner: RunnerFactory  # the job's (`lever_lm.rl.job`): RL data scoring, InfoScore beam search
    device: str  # the worker's own view: Ray shows each worker only its GPUs, so CUDA is cuda:0
    threads: int
    code: tuple[str, ...]  # the job's result code (`JobType.code`), whose digest `expected` holds
    expected: dict  # the driver's code digest and library versions; a worker must match them


class BlockWorker:
    """A Ray actor: loads the VQA backend once, then scores blocks in a thread of its own while the
    driver collects the finished queries, so a slow or distant driver never stalls the scoring."""

    def __init__(self) -> None:
        self.scorer: BlockRunner | None = None
        self.finished: queue.Queue = queue.Queue()
        self.error: BaseException | None = None

    def setup(self, inputs: Any, spec: WorkerSpec) -> dict:
        """Load the backend (an InputError stops the run); say who and where this worker is, and how it scores."""
        started = time.time()
        apply_process_settings()  # before CUDA starts (Ray started this process, not an entry point)
        torch.set_num_threads(spec.threads)
        _check_same_code_and_libraries(spec.expected, spec.code)
        inputs = from_object_store(inputs)
        backend = load_backend(
            spec.vqa_model,
            model_path=spec.model_path,
            device=spec.device,
            config=spec.config,
            batch_size=spec.batch_size,
        )
        self.scorer = spec.runner.build(inputs, backend, spec.device)
        return {
            "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpus": [str(gpu) for gpu in ray.get_gpu_ids()],
            "batch_size": backend.batch_size,
            "torch_threads": torch.get_num_threads(),
            "load_seconds": round(time.time() - started, 3),
        }

    def begin(self, block: list[int], todo: set[int]) -> None:
        """Start scoring a block; `collect` hands back its finished queries."""
        self.finished = queue.Queue()
        threading.Thread(target=self._score, args=(block, todo, self.finished), daemon=True).start()

    def _score(self, block: list[int], todo: set[int], finished: queue.Queue) -> None:
        try:
            for result in self.scorer.run(block, todo):
                finished.put(result)
            finished.put(BLOCK_DONE)
        except BaseException as error:  # raised to the driver by `collect`, after the results before it
            finished.put(error)

    def collect(self) -> tuple[list[QueryResult], bool]:
        """The queries finished since the last call (waiting for one at least), and whether the block is done."""
        if self.error is not None:
            raise self.error
        results, item = [], self.finished.get()
        while True:
            if item is BLOCK_DONE:
                return results, True
            if isinstance(item, BaseException):
                if results:
                    self.error = item
                    return results, False
                raise item
            results.append(item)
            try:
                item = self.finished.get_nowait()
            except queue.Empty:
                return results, False


def for_object_store(inputs: Any) -> Any:
    """The inputs as Ray's object store holds them: the embeddings as numpy arrays (one array when
    both files are the same), which every worker of a node maps read-only from the shared store,
    where a torch tensor would be unpickled into a private copy per worker. The data set's columns
    are numpy arrays already (`lever_lm.data.columns`), so inputs without embeddings (the beam data
    job's: the data set and the pools) go as they are."""
    if not isinstance(inputs, Inputs):
        return inputs
    query = inputs.query_emb.numpy()
    cand = query if inputs.cand_emb is inputs.query_emb else inputs.cand_emb.numpy()
    return dataclasses.replace(inputs, query_emb=query, cand_emb=cand)


def from_object_store(inputs: Any) -> Any:
    """The worker's view of `for_object_store`'s inputs: tensors over the shared, read-only arrays
    (nothing writes to the embeddings)."""
    if not isinstance(inputs, Inputs):
        return inputs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        query = torch.from_numpy(inputs.query_emb)
        cand = query if inputs.cand_emb is inputs.query_emb else torch.from_numpy(inputs.cand_emb)
    return dataclasses.replace(inputs, query_emb=query, cand_emb=cand)


def _check_same_code_and_libraries(expected: dict, code: Sequence[str]) -> None:
    """A worker with other code or other torch/transformers would mix numerics under one fingerprint."""
    import transformers

    from lever_lm.rl.fingerprints import code_digest

    found = {"code": code_digest(code), "torch": torch.__version__, "transformers": transformers.__version__}
    for name, value in expected.items():
        if found[name] != value:
            raise InputError(
                None,
                f"the Ray worker on {ray.util.get_node_ip_address()} has {name} {found[name]}, the driver {value}; "
                "every node needs the same project code and library versions (e.g. ray job submit --working-dir .)",
            )


# -- the driver side ------------------------------------------------------------------------------


@dataclass
class Block:
    """A block of the shard and what is left of it; `failures` counts the workers it lost."""

    index: int
    queries: list[int]
    todo: set[int]
    failures: int = 0

    def describe(self) -> str:
        return f"block {self.index} ({len(self.queries)} queries, rows {self.queries[0]}..{self.queries[-1]})"


@dataclass
class Worker:
    """The driver's record of one actor: what it runs now and what it did (for the meta sidecar)."""

    number: int
    actor: object
    info: dict = field(default_factory=dict)  # from setup: node, pid, gpus, batch_size, load_seconds
    block: Block | None = None
    block_started: float = 0.0
    blocks: int = 0
    queries: int = 0
    candidates: int = 0
    busy_seconds: float = 0.0
    lost: str | None = None

    @property
    def ready(self) -> bool:
        return bool(self.info) and self.lost is None

    def record(self) -> dict:
        return {
            "worker": self.number,
            **self.info,
            "blocks": self.blocks,
            "queries": self.queries,
            "candidates": self.candidates,
            "busy_seconds": round(self.busy_seconds, 3),
            "lost": self.lost,
        }


class RayEngine:
    """A run's Ray session: connected and checked before the journal is opened, closed after the run
    (a Ray started here stops with it; a cluster that was joined goes on)."""

    def __init__(self, request: JobOptions):
        self.request = request
        self.device = worker_device(request.device)
        cuda = self.device.startswith("cuda")
        self.gpus_per_worker = request.gpus_per_worker if request.gpus_per_worker is not None else float(cuda)
        connect(request.ray_address)
        try:
            capacity, nodes = cluster_capacity(self.gpus_per_worker)
            self.num_workers = request.num_workers or (capacity if cuda else 1)
            if self.num_workers > capacity or self.num_workers < 1:
                raise InputError(
                    None,
                    f"the Ray cluster has room for {capacity} workers with {self.gpus_per_worker:g} GPU(s) and "
                    f"{CPUS_PER_WORKER} CPU each ({nodes}); asked for {self.num_workers} (--num_workers)",
                )
        except BaseException:
            self.close()
            raise
        log.info("Ray: %d workers with %g GPU(s) each; cluster %s", self.num_workers, self.gpus_per_worker, nodes)

    def run(
        self,
        inputs: Any,
        settings: dict,
        queries: Sequence[int],
        todo: set[int],
        block_size: int,
        on_result: Callable[[QueryResult], None],
        job: JobType,
        batch_size: int | None,
        torch_threads: int | None,
        pin: Callable[[Pins], None],
    ) -> dict:
        """Run every block of `queries` that holds a query of `todo` on the workers, each building the
        `job`'s block runner; hand each result to `on_result` (the journal) as it arrives. `batch_size`
        and `torch_threads` (CPU): the journal's pins, or None to pin (with `pin`) what the first worker
        uses. Returns what the meta sidecar records: seconds until the first worker was ready, seconds of scoring after
        that, each worker's record."""
        import transformers

        request = self.request
        on_cpu = self.device == "cpu"
        threads = torch_threads if on_cpu and torch_threads else CPUS_PER_WORKER
        spec = WorkerSpec(
            vqa_model=request.vqa_model,
            model_path=request.vqa_model_path,
            config=request.config,
            batch_size=batch_size,
            runner=job.runner,
            device=self.device,
            threads=threads,
            code=job.code,
            expected={"code": settings["code"], "torch": torch.__version__, "transformers": transformers.__version__},
        )
        blocks = [
            Block(i, block, todo.intersection(block))
            for i, block in enumerate(blocks_of(queries, block_size))
            if todo.intersection(block)
        ]
        num_workers = min(self.num_workers, len(blocks))  # a worker without a block would only load a model
        started = time.time()
        with Progress(len(todo), enabled=request.progress, workers=num_workers, unit=job.unit) as bar:

            def journal_and_count(result: QueryResult) -> None:
                on_result(result)
                bar.done(result)

            def pin_batch_size(size: int) -> None:
                pin(Pins(size, threads if on_cpu else None))

            # On CUDA an open batch size comes from each worker's free memory: one worker decides it
            # for all. On a CPU it is the config's (or the default) in every worker alike.
            dispatcher = Dispatcher(
                ray.put(for_object_store(inputs)),
                spec,
                self.gpus_per_worker,
                blocks,
                journal_and_count,
                pin_batch_size,
                load_one_first=spec.batch_size is None and not on_cpu,
            )
            dispatcher.run(num_workers)
        first_ready = dispatcher.first_ready or started
        return {
            "name": "ray",
            "gpus_per_worker": self.gpus_per_worker,
            "batch_size": dispatcher.spec.batch_size,
            "startup_seconds": round(first_ready - started, 3),
            "scoring_seconds": round(time.time() - first_ready, 3),
            "workers": [worker.record() for worker in dispatcher.workers],
        }

    def close(self) -> None:
        ray.shutdown()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Dispatcher:
    """Hands blocks to free workers, collects finished queries, replaces lost workers."""

    def __init__(
        self,
        inputs_ref,
        spec: WorkerSpec,
        gpus_per_worker: float,
        blocks: list[Block],
        on_result: Callable,
        pin_batch_size: Callable[[int], None],
        load_one_first: bool = False,
    ):
        self.inputs_ref = inputs_ref
        self.spec = spec  # its batch_size is None until the first worker has chosen one
        self.pin_batch_size = pin_batch_size  # the journal's `pin`: refuses a batch size other than its own
        self.load_one_first = load_one_first  # the others load once the first has chosen the batch size
        self.num_workers = 0
        self.actor_class = ray.remote(BlockWorker).options(num_cpus=CPUS_PER_WORKER, num_gpus=gpus_per_worker)
        self.pending: deque[Block] = deque(blocks)
        self.on_result = on_result
        self.workers: list[Worker] = []
        self.calls: dict = {}  # outstanding call -> (worker, "setup" | "results")
        self.lost_while_loading = 0
        self.first_ready: float | None = None  # when the first worker could take a block

    def run(self, num_workers: int) -> None:
        try:
            self.start_workers(num_workers)
            while self.pending or any(w.block is not None for w in self.workers):
                self.hand_out()
                ready, _ = ray.wait(list(self.calls), num_returns=1, timeout=WAIT_NOTE_SECONDS)
                if not ready:
                    self.note_waiting()
                    continue
                worker, kind = self.calls.pop(ready[0])
                try:
                    value = ray.get(ready[0])
                except LOST_WORKER as error:
                    self.replace(worker, error)
                    continue
                except RayTaskError as error:  # raised by our code in the worker: stop the run with it
                    cause = getattr(error, "cause", None)
                    raise (cause if isinstance(cause, BaseException) else error) from error
                if kind == "setup":
                    self.ready(worker, value)
                else:
                    self.received(worker, *value)
        finally:
            for worker in self.workers:
                ray.kill(worker.actor)

    def start_workers(self, num_workers: int) -> None:
        self.num_workers = num_workers
        for _ in range(1 if self.load_one_first else num_workers):
            self.start_worker()

    def start_worker(self) -> None:
        worker = Worker(len(self.workers), self.actor_class.remote())
        self.workers.append(worker)
        self.calls[worker.actor.setup.remote(self.inputs_ref, self.spec)] = (worker, "setup")

    def ready(self, worker: Worker, info: dict) -> None:
        worker.info = info
        self.first_ready = self.first_ready or time.time()
        self.pin_batch_size(info["batch_size"])
        if self.spec.batch_size is None:
            self.spec = replace(self.spec, batch_size=info["batch_size"])
        while sum(1 for w in self.workers if w.lost is None) < self.num_workers:
            self.start_worker()  # with the batch size decided
        log.info(
            "Ray worker %d ready on %s: pid %d, GPUs %s, batch size %d, loaded in %.1fs",
            worker.number,
            info["node"],
            info["pid"],
            info["gpus"] or "none",
            info["batch_size"],
            info["load_seconds"],
        )

    def hand_out(self) -> None:
        for worker in self.workers:
            if not self.pending:
                return
            if worker.ready and worker.block is None:
                block = self.pending.popleft()
                worker.block, worker.block_started = block, time.time()
                worker.actor.begin.remote(block.queries, set(block.todo))
                self.calls[worker.actor.collect.remote()] = (worker, "results")

    def received(self, worker: Worker, results: list[QueryResult], done: bool) -> None:
        block = worker.block
        if done:
            worker.blocks += 1
            worker.busy_seconds += time.time() - worker.block_started
            worker.block = None
        else:
            self.calls[worker.actor.collect.remote()] = (worker, "results")
        for result in results:
            block.todo.discard(result.query_idx)
            worker.queries += 1
            worker.candidates += result.work
            self.on_result(result)

    def replace(self, worker: Worker, error: BaseException) -> None:
        """Put the lost worker's block back (without what is journaled) and start a replacement."""
        worker.lost = compact(error)
        ray.kill(worker.actor)  # an actor that is only unreachable must not go on working
        block, worker.block = worker.block, None
        if block is None:
            self.lost_while_loading += 1
            what = "while loading"
            if self.lost_while_loading >= MAX_BLOCK_FAILURES:
                raise WorkersLost(f"{self.lost_while_loading} Ray workers were lost while loading; last: {worker.lost}")
        else:
            worker.busy_seconds += time.time() - worker.block_started
            block.failures += 1
            what = f"on {block.describe()}"
            if block.failures >= MAX_BLOCK_FAILURES:
                raise WorkersLost(f"{block.describe()} lost {block.failures} Ray workers; last: {worker.lost}")
            if block.todo:
                self.pending.appendleft(block)
        log.warning("Ray worker %d lost %s (%s); starting a replacement", worker.number, what, worker.lost)
        self.start_worker()

    def note_waiting(self) -> None:
        if not any(w.ready for w in self.workers):
            starting = sum(1 for w in self.workers if w.lost is None)
            log.warning("no Ray worker is running yet (%d starting): is the cluster busy or short of GPUs?", starting)


# -- connecting ----------------------------------------------------------------------------------


def worker_device(device: str) -> str:
    """The device as a worker sees it: Ray shows each worker only its own GPUs, so CUDA is cuda:0."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise InputError(None, f"--device {device!r} is not a torch device: {error}") from None
    if kind not in ("cpu", "cuda"):
        raise InputError(None, f"--device {device}: the Ray engine runs on cuda or cpu")
    return "cuda:0" if kind == "cuda" else "cpu"


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto", HOST:PORT, ray://HOST:PORT) or, with none, start a new
    Ray here -- never silently joining another user's Ray on this machine -- unless $RAY_ADDRESS
    names a cluster (as under `ray job submit`). Any failure is an InputError."""
    joining = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    if address not in (None, "auto"):
        check_reachable(address)
    try:
        if joining:
            ray.init(address=address)
        else:  # Ray renices its workers to 15 by default; here they are the job, not background work
            ray.init(address="local", include_dashboard=False, _system_config={"worker_niceness": 0})
    except Exception as error:  # ConnectionError, ValueError, an authentication error, ...
        where = address or os.environ.get("RAY_ADDRESS") or "a new local Ray"
        raise InputError(None, f"--ray_address {where}: cannot connect: {compact(error)}") from None


def check_reachable(address: str) -> None:
    """A quick TCP check, so that a wrong address fails in seconds, not after Ray's long retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(None, f"--ray_address {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise InputError(None, f"--ray_address {address}: no Ray cluster answers there ({error})") from None


def cluster_capacity(gpus_per_worker: float) -> tuple[int, str]:
    """How many workers the live nodes can hold at once, and the nodes in words."""
    total, described = 0, []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        total += worker_slots(cpus, gpus, gpus_per_worker)
        described.append(f"{node.get('NodeManagerAddress', '?')}: {cpus:g} CPUs, {gpus:g} GPUs")
    return total, "; ".join(described) or "no live node"


def worker_slots(cpus: float, gpus: float, gpus_per_worker: float) -> int:
    """Workers one node holds: a fraction of a GPU packs within one GPU, never across two."""
    by_cpu = math.floor(cpus / CPUS_PER_WORKER + 1e-9)
    if gpus_per_worker == 0:
        return by_cpu
    if gpus_per_worker <= 1:
        by_gpu = math.floor(gpus + 1e-9) * math.floor(1 / gpus_per_worker + 1e-9)
    else:
        by_gpu = math.floor(gpus / gpus_per_worker + 1e-9)
    return min(by_cpu, by_gpu)


def compact(error: BaseException) -> str:
    """An error on one line, short enough for a log line and the meta sidecar."""
    text = re.sub(r"\s+", " ", str(error)).strip()
    return f"{type(error).__name__}: {text[:400]}" if text else type(error).__name__
