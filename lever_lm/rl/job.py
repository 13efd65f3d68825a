"""What a per-query job tells the shared machinery, so that one machinery serves every job.

The RL data generator and the InfoScore beam search are both "for each query, a record":
blocks of queries (`blocks`), shards, the journal (resume after kill -9), the fingerprint, the
engines (local, Ray) and the final file written from the journals (`generate`, `output`). What
differs is said here, by a `JobType`:

- `runner`: builds, in the process that scores (this one or a Ray worker), the `BlockRunner` that
  turns a block of queries into `QueryResult`s; picklable, so that a Ray worker can build its own;
- `new_totals`: counts what the final file holds (the log and the meta sidecar);
- `describe`: one log line about the finished file;
- `unit`: what a result's `work` counts (candidates scored, prompts scored), for progress and meta;
- `code`: the project code that shapes the job's results (its fingerprint; a Ray worker checks it);
- `meta`: the `<output>.meta.json` sidecar of a finished run, from the plan, the journals, the run's
  summary and the file's sha256 (`RunMeta` for RL data, which validation reads back; a dict of the
  same top-level keys for beam data).

A job's records are checked on every journal read by the rules its journal spec carries
(`RecordRules` for RL data, `BeamRules` for beam data): each says what its records look like.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lever_lm.rl.blocks import QueryResult


class BlockRunner(Protocol):
    def run(self, block: Sequence[int], todo: set[int]) -> Iterator[QueryResult]:
        """The results of the block's queries that are in `todo`, in block order."""
        ...


class RunnerFactory(Protocol):
    def build(self, inputs: Any, backend: Any, device: str) -> BlockRunner:
        """The block runner of one process, from the run's inputs and its loaded VQA backend."""
        ...


class Totals(Protocol):
    def add(self, entry: dict, stats: dict | None = None) -> None: ...

    def as_dict(self) -> dict: ...


@dataclass(frozen=True)
class JobType:
    """One kind of per-query job (see the module doc)."""

    name: str
    runner: RunnerFactory
    new_totals: Callable[[], Totals]
    describe: Callable[[dict, float], str]
    unit: str
    code: tuple[str, ...]
    meta: Callable[..., Any]
