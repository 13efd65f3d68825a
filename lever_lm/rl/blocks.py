"""The unit of work of every engine: a block of queries, proposed and scored exactly as a fresh run would.

Queries go through the pipeline in fixed blocks of `PROPOSAL_BLOCK` consecutive beam-data
queries (blocks are also the unit of sharding and of the Ray engine's scheduling). For one block,
`BlockScorer.run`:

1. proposes candidates for the WHOLE block with the SFT pointer (the pointer's floating point
   depends on the batch, so a block is always proposed whole, even when part of it is done);
2. lays the block's candidates out in one flat list (query by query) and cuts it into chunks of
   the backend's batch size -- always from the block's first candidate, so every chunk holds the
   same prompts, in the same order, with the same batch-mates and padding as in a fresh run;
3. lets the backend prepare the images of those chunks ahead (`prefetch`), then sends to the VQA
   backend only the chunks that hold a query still to do; a chunk that straddles
   done and to-do queries runs in full and the done queries' answers are dropped. On a GPU in
   bf16 an answer can depend on its batch-mates, so this is what makes a resumed run write the
   answers an uninterrupted run writes;
4. builds each to-do query's record as soon as its last chunk is scored, in block order. With
   `gt_prob`, every prompt also asks the backend for the likelihood of each of the query's
   distinct human answers (`vqa_gt_prob`, docs/formats.md §7).

With per-query pools (`--pool per_query`) each query is proposed over its own pool alone: the
block's pools come from `inputs.pools`, a candidate's pointer holds positions in its query's pool
(prompts are built from the global rows), and the record carries the pool beside `query`.

A query whose own image cannot be read gets no real scores: every candidate shows that image, so
its group would be all zeros that look like data. Its result says so (`query_error`), and the
final JSON leaves it out (see `lever_lm.rl.output`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from lever_lm.models.v3.proposals import Candidate, Proposer, QueryProposals
from lever_lm.rl.inputs import Inputs
from lever_lm.rl.records import candidate_record, entry_record, query_record
from lever_lm.rl.request import PROPOSAL_BLOCK
from lever_lm.vqa.backends.base import (
    AcceleratorFailure,
    Generation,
    VQABackend,
    accelerator_message,
    is_accelerator_failure,
)
from lever_lm.vqa.expected_accuracy import distinct_answers
from lever_lm.vqa.images import UnreadableImage, read_rgb
from lever_lm.vqa.metric import prepare_answers
from lever_lm.vqa.prompts import build_prompt


@dataclass
class QueryResult:
    """A finished query: its record, its statistics, why it could not be scored (if so), and how much
    work it took in the job's unit (candidates, prompts: for progress and the meta sidecar)."""

    query_idx: int
    entry: dict
    stats: dict = field(default_factory=dict)
    work: int = 0

    @property
    def query_error(self) -> str | None:
        return self.stats.get("query_error")


def blocks_of(queries: Sequence[int], block_size: int = PROPOSAL_BLOCK) -> list[list[int]]:
    """Consecutive blocks of `block_size` queries (the last one may be shorter)."""
    return [list(queries[i : i + block_size]) for i in range(0, len(queries), block_size)]


def shard_of(queries: Sequence[int], num_shards: int, shard_id: int, block_size: int = PROPOSAL_BLOCK) -> list[int]:
    """The shard's queries: blocks dealt round-robin, so shards are whole blocks."""
    return [q for block in blocks_of(queries, block_size)[shard_id::num_shards] for q in block]


@dataclass(frozen=True)
class ScorerSettings:
    """How the RL job's block runner scores (`job.RunnerFactory`): what a Ray worker needs to build its own."""

    eval_mode: str
    block_size: int
    gt_prob: bool = True

    def build(self, inputs: Inputs, backend: VQABackend, device: str) -> BlockScorer:
        return BlockScorer(inputs, backend, self.eval_mode, device, self.block_size, self.gt_prob)


class BlockScorer:
    """Proposes and scores blocks of queries with one pointer and one VQA backend (see the module doc)."""

    def __init__(
        self, inputs: Inputs, backend: VQABackend, eval_mode: str, device: str, block_size: int, gt_prob: bool = True
    ):
        self.inputs = inputs
        self.backend = backend
        self.eval_mode = eval_mode
        self.gt_prob = gt_prob
        self.proposer = Proposer(
            inputs.pointer,
            inputs.query_emb,
            inputs.cand_emb,
            inputs.proposal,
            image_ids=inputs.dataset.image_ids,
            device=device,
            query_batch_size=block_size,
            per_query=inputs.pools is not None,
        )

    def run(self, block: Sequence[int], todo: set[int]) -> Iterator[QueryResult]:
        """The results of the block's queries that are in `todo`, in block order."""
        if not todo.intersection(block):
            return
        pools = self.inputs.pools.pools_of(block) if self.inputs.pools is not None else None
        yield from self.score(self._propose(block, pools), todo)

    def _propose(self, block: Sequence[int], pools) -> list[QueryProposals]:
        """The block's proposals; an accelerator failure of the pointer stops the run as one of the VQA
        model does (`AcceleratorFailure`, exit 3), never as a traceback."""
        try:
            return self.proposer.propose(block, pools)
        except RuntimeError as error:
            if is_accelerator_failure(error):
                raise AcceleratorFailure(accelerator_message(error)) from error
            raise

    def score(self, proposals: list[QueryProposals], todo: set[int]) -> Iterator[QueryResult]:
        """Score the block's candidates chunk by chunk (chunks cut from the whole block)."""
        flat = [(i, j, c) for i, p in enumerate(proposals) for j, c in enumerate(p.candidates)]
        size = self.backend.batch_size
        chunks = [flat[start : start + size] for start in range(0, len(flat), size)]
        prompts = [
            self._prompts(proposals, chunk) if self._holds_work(proposals, chunk, todo) else None for chunk in chunks
        ]
        self.backend.prefetch([p for chunk_prompts in prompts if chunk_prompts for p in chunk_prompts])
        generations: list[list[Generation | None]] = [[None] * len(p.candidates) for p in proposals]
        remaining = [len(p.candidates) for p in proposals]
        next_to_yield = 0
        for chunk, chunk_prompts in zip(chunks, prompts):
            if chunk_prompts is not None:
                replies = [self._replies(proposals[i].query_idx) for i, _, _ in chunk] if self.gt_prob else None
                for (i, j, _), generation in zip(chunk, self.backend.generate(chunk_prompts, replies), strict=True):
                    generations[i][j] = generation
            for i, _, _ in chunk:
                remaining[i] -= 1
            while next_to_yield < len(proposals) and remaining[next_to_yield] == 0:
                if proposals[next_to_yield].query_idx in todo:
                    yield self._result(proposals[next_to_yield], generations[next_to_yield])
                next_to_yield += 1
        for p, g in zip(proposals[next_to_yield:], generations[next_to_yield:]):  # queries without candidates
            if p.query_idx in todo:
                yield self._result(p, g)

    @staticmethod
    def _holds_work(proposals: list[QueryProposals], chunk: list[tuple[int, int, Candidate]], todo: set[int]) -> bool:
        return any(proposals[i].query_idx in todo for i, _, _ in chunk)

    def _prompts(self, proposals: list[QueryProposals], chunk: list[tuple[int, int, Candidate]]) -> list:
        return [
            build_prompt(self.inputs.dataset, proposals[i].query_idx, proposals[i].global_pointer(c))
            for i, _, c in chunk
        ]

    def _replies(self, query_idx: int) -> tuple[str, ...]:
        """The replies whose likelihoods give `vqa_gt_prob`: the query's distinct human answers."""
        return distinct_answers(self.inputs.scoring_answers[query_idx])

    def _result(self, proposals: QueryProposals, generations: list[Generation | None]) -> QueryResult:
        query_idx = proposals.query_idx
        item = self.inputs.dataset[query_idx]
        answers = self.inputs.scoring_answers[query_idx]
        prepared = prepare_answers(list(answers), mode=self.eval_mode)
        replies = self._replies(query_idx) if self.gt_prob else None
        pool = proposals.pool
        candidates = [
            candidate_record(c, g, prepared, answers, replies, pool) for c, g in zip(proposals.candidates, generations)
        ]
        query = query_record(query_idx, item.question_id, item.image_id, item.question, answers)
        entry = entry_record(query, candidates, pool)
        stats: dict = {"duplicates_dropped": dict(proposals.duplicates_dropped)}
        if any(c["eval_failed"] for c in candidates):
            reason = self._unreadable_query_image(query_idx)
            if reason is not None:
                stats["query_error"] = reason
        return QueryResult(query_idx, entry, stats, work=len(candidates))

    def _unreadable_query_image(self, query_idx: int) -> str | None:
        """Why the query's own image cannot be read, or None (checked only when a candidate failed)."""
        try:
            read_rgb(self.inputs.dataset.image_path(query_idx))
        except UnreadableImage as error:
            return f"the query's image cannot be read: {error}"
        return None
