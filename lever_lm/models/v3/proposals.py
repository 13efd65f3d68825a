"""Candidate ICD sequences for each query: beam search, temperature samples, random, retrieval (docs/formats.md §4).

For a query the SFT pointer (PointerSelectorV2) defines, step by step, a distribution over the
pool; a candidate is an ordered sequence of `shot_num` distinct pool rows (in prompt order). The
query's own row, and optionally every row sharing its image, is never proposed: like rows already
picked, those rows get probability 0 at every step (masked before the softmax, so each step's
distribution is renormalised over the rows left).

Pools (docs/formats.md §7). By default the pool is every training row, and a pointer holds global training
rows. With per-query pools (`Proposer(..., per_query=True)`, pools from `lever_lm.models.v3.pools`)
each query is proposed over its own pool alone: the pool rows' embeddings, in pool order, are
the pointer's whole input (attention and choices), exactly as if the pool were all there is, and
a pointer holds positions in that pool. The query is never in its pool. Pools differ per query,
so those queries are proposed one at a time: a 64-row pool is tiny, and a query costs 3-8 ms on
two CPU cores (`benchmarks/bench_pools.py`), about 1% of its VQA scoring on a GPU.

Methods, in de-duplication priority order:
  beam      beam search of width `num_beams`: at each step every live beam is extended by every
            pool row and the best `num_beams` sequences by summed log-probability survive.
            logprob_score = sum of step log-probs, beam_score = sum of step probabilities (the
            lineage's meaning, kept), beam_rank 0.. in descending logprob_score. When fewer than
            `num_beams` sequences exist (tiny pools), fewer beams are returned.
  sample    for each T in `temps`, `num_samples_per_temp` sequences drawn step by step from
            softmax(logits / T) over the rows still allowed; logprob_score = the sequence's
            log-probability under that tempered distribution, temperature = T.
  random    `num_random` sequences drawn uniformly among the allowed rows, no repeated row.
  retrieval `num_retrieval` sequences that ignore the pointer model: with sim(j) = cosine between
            the raw query embedding and the raw embedding of pool row j (allowed rows only), the
            sets of `shot_num` distinct rows with the largest sum of sim, best first (ties by the
            rows' similarity ranks, lexicographically); each set is put in prompt order by
            decreasing sim. All score fields are None.
Retrieval comes last in the priority so that enabling it never changes which beam, sample or
random candidates survive. A candidate equal (as an ordered sequence: [a, b] != [b, a]) to one
kept earlier is dropped and counted in `duplicates_dropped[gen_method]`.

Speed. Queries are processed in batches. For each step, the batch's partial sequences (beams and
samples, each with its own gated state) are scored against the pool in one streaming pass: the
pool is cut into tiles of SCAN_CHUNK rows, and for every tile one matmul gives the logits of all
rows of the batch, which are reduced at once to per-tile statistics (a running top-k for beams,
a log-sum-exp per row; a sample's temperature is folded into its state, logits being linear in
it). Nothing of size [rows, K] is ever materialised, and the pool is read once per batch and step.
Beam search stays exact (every pool row is considered for every beam). A sample is drawn exactly
in two levels: the scan keeps the log-sum-exp of every block of DRAW_BLOCK pool rows; a Gumbel-max
over those block masses picks the block, then that one block's logits are recomputed for that one
row and a Gumbel-max inside it picks the row (DRAW_BLOCK logits per draw).

Determinism. Every random number of a query comes from `query_generator(seed, query_idx)` and is
drawn up front in a fixed order (the [S, shot_num, blocks + DRAW_BLOCK] float64 uniforms of the
samples' Gumbel noise, then the random sequences), so the proposals of a query do not depend on
which other queries share its batch, nor on resuming or sharding. Floating point is the one caveat:
a BLAS matmul rounds a row differently when the batch has another size, so scores can differ in
the last bits (~1e-6) between batchings. The choices themselves are robust to that: a beam or a
Gumbel-max pick changes only if two candidates tie to within rounding (an inverse-CDF sampler,
tried first, changed about one sample in 400 between batchings at K = 20,000; this one changed
none of 1,280 candidates at K = 443,757, batch 64 vs 13).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lever_lm.errors import InputError
from lever_lm.models.v2.pointer_selector import PointerSelectorV2, PoolEncoding

# Pool rows per tile of the streaming scan: [rows of a batch, SCAN_CHUNK] stays in cache.
SCAN_CHUNK = 2_048
# Pool rows per block of the sampling CDF (a divisor of SCAN_CHUNK): a draw recomputes one block of
# logits for one row.
DRAW_BLOCK = 256
# Default number of queries per batch; the pool is read once per batch and step.
DEFAULT_QUERY_BATCH = 64
# The retrieval method enumerates sets of the top rows; refuse settings that would enumerate more.
MAX_RETRIEVAL_SETS = 1_000_000
METHODS = ("beam", "sample", "random", "retrieval")
# Below this the tempered logits (|cosine| / 0.1 / T) leave float32's safe range and scores turn NaN.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class ProposalSettings:
    """How many candidates of each kind to propose per query (docs/formats.md §4); validated on creation."""

    shot_num: int = 2
    num_beams: int = 5
    temps: tuple[float, ...] = (1.0, 1.3)
    num_samples_per_temp: int = 2
    num_random: int = 1
    num_retrieval: int = 0
    exclude_same_image: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        object.__setattr__(self, "temps", tuple(float(t) for t in self.temps))
        if self.shot_num < 1:
            raise InputError(None, f"shot_num must be >= 1, got {self.shot_num}")
        for name in ("num_beams", "num_samples_per_temp", "num_random", "num_retrieval"):
            if getattr(self, name) < 0:
                raise InputError(None, f"{name} must be >= 0, got {getattr(self, name)}")
        for t in self.temps:
            if not (math.isfinite(t) and t > 0):
                raise InputError(None, f"every temperature must be a finite number > 0, got {t}")
            if t < MIN_TEMPERATURE:
                raise InputError(
                    None,
                    f"temperature {t:g} is below {MIN_TEMPERATURE:g}: the tempered scores would overflow; "
                    "such a temperature is greedy decoding, which the beams already give",
                )
        if self.num_beams + self.samples_per_query + self.num_random + self.num_retrieval == 0:
            raise InputError(
                None,
                "no proposal method is enabled (num_beams, temps x num_samples_per_temp, "
                "num_random and num_retrieval are all 0)",
            )

    @property
    def samples_per_query(self) -> int:
        return len(self.temps) * self.num_samples_per_temp


@dataclass(frozen=True)
class Candidate:
    """One proposed ICD sequence and the scores of the method that proposed it."""

    pointer: tuple[int, ...]  # pool rows in prompt order: global training rows, or positions in a per-query pool
    gen_method: str  # "beam" | "sample" | "random" | "retrieval"
    beam_rank: int | None = None
    beam_score: float | None = None  # sum of step probabilities
    logprob_score: float | None = None  # sum of step log-probs (tempered for samples)
    temperature: float | None = None


@dataclass
class QueryProposals:
    """The de-duplicated candidates of one query, in priority order beam, sample, random, retrieval."""

    query_idx: int
    candidates: list[Candidate]
    duplicates_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METHODS, 0))
    pool: tuple[int, ...] | None = None  # the query's own pool (global rows, pool order); None: the global pool

    def global_pointer(self, candidate: Candidate) -> tuple[int, ...]:
        """The candidate's ICDs as global training rows."""
        return candidate.pointer if self.pool is None else tuple(self.pool[i] for i in candidate.pointer)


def query_generator(seed: int, query_idx: int, stream: str = "proposals") -> torch.Generator:
    """The random generator of one query: seeded by a stable hash of (stream, seed, query id).

    A hash (not seed + query_idx) keeps neighbouring queries' streams unrelated, and Python's
    `hash` is salted per process, so sha256 it is. `stream` names what the numbers are for, so
    that two uses (the proposals, the query's random pool) never share random numbers.
    """
    digest = hashlib.sha256(f"lever_lm.{stream}:{int(seed)}:{int(query_idx)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class _Scan:
    """Per-tile statistics of one step for a batch of rows (see `_scan_pool`)."""

    block_lse: Tensor  # [R, blocks] log-sum-exp of each row's (tempered, masked) logits per block
    block: int  # pool rows per block
    top_values: Tensor  # [Rb, k] best untempered logits of each beam row
    top_indices: Tensor  # [Rb, k] their pool rows


@dataclass
class _StepRows:
    """The rows scored in one step: [R, h] states (divided by T), their banned pool rows, roles."""

    rows: Tensor
    banned: Tensor  # [R, n]
    beam_rows: int  # rows [0, beam_rows) are the beams (T = 1)
    draw_rows: Tensor  # [V] the row each sample draw uses, in (query, temperature) order


@dataclass
class _Beams:
    """Live beams of a batch: `slots` per query (1 before the first step, then up to num_beams)."""

    seq: Tensor  # [Q, slots, t] pool rows picked so far
    logp: Tensor  # [Q, slots] summed log-probs (-inf: no such sequence, tiny pools)
    prob: Tensor  # [Q, slots] summed probabilities
    state: Tensor  # [Q * slots, h]

    @classmethod
    def start(cls, state0: Tensor) -> _Beams:
        Q, dev = len(state0), state0.device
        return cls(
            seq=torch.empty(Q, 1, 0, dtype=torch.long, device=dev),
            logp=torch.zeros(Q, 1, device=dev),
            prob=torch.zeros(Q, 1, device=dev),
            state=state0,
        )

    def candidates(self, i: int) -> list[Candidate]:
        """Query i's beams in rank order; impossible ones (-inf) are left out."""
        return [
            Candidate(
                tuple(self.seq[i, b].tolist()),
                "beam",
                beam_rank=b,
                beam_score=float(self.prob[i, b]),
                logprob_score=float(self.logp[i, b]),
            )
            for b in range(self.seq.shape[1])
            if math.isfinite(float(self.logp[i, b]))
        ]


@dataclass
class _Samples:
    """Samples of a batch: S = len(temps) x n per query, ordered (temperature, sample)."""

    seq: Tensor  # [Q, S, t]
    logp: Tensor  # [Q, S] summed tempered log-probs
    state: Tensor  # [Q * S, h] (not divided by T)
    temp: Tensor  # [Q * S] temperature of each sample row

    @classmethod
    def start(cls, state0: Tensor, temps: tuple[float, ...], n: int) -> _Samples:
        Q, S, dev = len(state0), len(temps) * n, state0.device
        return cls(
            seq=torch.empty(Q, S, 0, dtype=torch.long, device=dev),
            logp=torch.zeros(Q, S, device=dev),
            state=state0.repeat_interleave(S, dim=0),
            temp=torch.tensor(temps, device=dev).repeat_interleave(n).repeat(Q),
        )

    def candidates(self, i: int, temps: tuple[float, ...], n: int) -> list[Candidate]:
        return [
            Candidate(
                tuple(self.seq[i, j].tolist()),
                "sample",
                logprob_score=float(self.logp[i, j]),
                temperature=temps[j // n],
            )
            for j in range(self.seq.shape[1])
        ]


@dataclass
class _Pool:
    """The rows a query's candidates are chosen from, encoded once: the global pool, or one query's pool."""

    encoding: PoolEncoding
    emb: Tensor  # [K, d] raw embeddings, pool order (the retrieval method's cosines)
    norms: Tensor | None  # [K] their norms (retrieval only)

    @property
    def size(self) -> int:
        return self.emb.shape[0]


class Proposer:
    """Proposes candidates for queries; a pool is encoded once, here (the global one) or per query.

    `query_emb` [N, d] / `cand_emb` [K, d]: the embeddings (docs/formats.md §3.3); a query id is a training
    row, used both as a row of `query_emb` and, with the global pool, as the row it must never
    propose. `image_ids` [K]: image id of each row, needed by `exclude_same_image`. The model is
    moved to `device` and put in eval mode. `query_batch_size` queries share each pass over the
    global pool (memory per step ~ batch x (beams + samples) x SCAN_CHUNK floats).
    `per_query`: every query brings its own pool (`propose(ids, pools)`); the global pool is then
    never encoded. `held_out`: the queries are rows of `query_emb` from another split (the
    validation queries of an evaluation), not pool rows: no pool row is theirs, so none is banned
    for being the query or left out of the attention (the global pool only).
    """

    def __init__(
        self,
        model: PointerSelectorV2,
        query_emb: Tensor,
        cand_emb: Tensor,
        settings: ProposalSettings,
        image_ids: Sequence[int] | None = None,
        device: str = "cpu",
        query_batch_size: int | None = None,
        per_query: bool = False,
        held_out: bool = False,
    ):
        _check_embeddings(model, query_emb, cand_emb)
        if held_out and (per_query or settings.exclude_same_image):
            raise ValueError("held-out queries are proposed over the global pool, without exclude_same_image")
        self.settings = settings
        self.device = torch.device(device)
        self.pool_size = cand_emb.shape[0]
        self.per_query = per_query
        self.held_out = held_out
        self.query_batch_size = DEFAULT_QUERY_BATCH if query_batch_size is None else int(query_batch_size)
        if self.query_batch_size < 1:
            raise InputError(None, f"query_batch_size must be >= 1, got {query_batch_size}")
        if settings.shot_num > self.pool_size - 1:
            raise InputError(
                None,
                f"shot_num {settings.shot_num} needs at least {settings.shot_num + 1} pool rows "
                f"(the query is never its own ICD); the pool has {self.pool_size}",
            )
        if settings.exclude_same_image and image_ids is None:
            raise InputError(None, "exclude_same_image needs the image id of every pool row (image_ids)")
        self._image_groups = ImageGroups(image_ids, self.pool_size) if settings.exclude_same_image else None
        self.model = model.to(self.device).eval()
        self.query_emb = query_emb
        self.cand_emb = cand_emb  # kept (not copied) for the retrieval method and per-query pools
        self.pool: PoolEncoding | None = None
        self._global: _Pool | None = None
        if not per_query:
            with torch.no_grad():
                self.pool = self.model.encode_pool(cand_emb.to(self.device, torch.float32))
            norms = cand_emb.float().norm(dim=1).clamp_min(1e-12) if settings.num_retrieval else None
            self._global = _Pool(self.pool, cand_emb, norms)

    # -- public ----------------------------------------------------------------------------

    def propose(self, query_ids: Sequence[int], pools: Sequence[Sequence[int]] | None = None) -> list[QueryProposals]:
        """De-duplicated candidates for each query id (a training row), in the given order.

        `pools` (per-query mode only): each query's pool, global rows in pool order; the
        candidates' pointers are then positions in it.
        """
        ids = [int(q) for q in query_ids]
        own = [tuple(int(r) for r in p) for p in pools] if pools is not None else None
        groups = self.propose_by_method(ids, own)
        return [
            _deduplicate(q, [g[m] for m in METHODS], pool) for q, g, pool in zip(ids, groups, own or [None] * len(ids))
        ]

    def propose_by_method(
        self, query_ids: Sequence[int], pools: Sequence[Sequence[int]] | None = None
    ) -> list[dict[str, list[Candidate]]]:
        """Every method's candidates for each query, before de-duplication, batch by batch."""
        ids = [int(q) for q in query_ids]
        limit = self.query_emb.shape[0] if self.held_out else min(self.query_emb.shape[0], self.pool_size)
        for q in ids:
            if not 0 <= q < limit:
                raise InputError(None, f"query id {q} is out of range: the embeddings have {limit} rows")
        if self.per_query != (pools is not None):
            raise ValueError("per-query pools are given exactly when the proposer was made with per_query=True")
        if pools is not None:
            if len(pools) != len(ids):
                raise ValueError(f"{len(pools)} pools for {len(ids)} queries")
            return [self._propose_in_pool(q, [int(r) for r in rows]) for q, rows in zip(ids, pools)]
        result: list[dict[str, list[Candidate]]] = []
        for start in range(0, len(ids), self.query_batch_size):
            batch = ids[start : start + self.query_batch_size]
            if self.held_out:  # not pool rows: nothing of the pool is the query's own
                banned, exclude = [[] for _ in batch], None
            else:
                banned = [banned_rows(q, self._image_groups) for q in batch]
                exclude = torch.tensor(batch, device=self.device)  # the query's own row takes no part in attention
            result.extend(self._propose_batch(batch, self._global, banned, exclude))
        return result

    # -- one batch -------------------------------------------------------------------------

    def _propose_in_pool(self, query_idx: int, rows: list[int]) -> dict[str, list[Candidate]]:
        """One query over its own pool alone: pointers are positions in `rows`."""
        if len(set(rows)) != len(rows) or any(not 0 <= r < self.pool_size for r in rows) or query_idx in rows:
            raise InputError(
                None,
                f"query {query_idx}: its pool must be distinct rows in 0..{self.pool_size - 1} "
                "without the query itself",
            )
        emb = self.cand_emb[rows]
        with torch.no_grad():
            encoding = self.model.encode_pool(emb.to(self.device, torch.float32))
        pool = _Pool(encoding, emb, emb.float().norm(dim=1).clamp_min(1e-12) if self.settings.num_retrieval else None)
        same_image = set(self._image_groups.rows_like(query_idx)) if self._image_groups is not None else set()
        banned = [i for i, row in enumerate(rows) if row in same_image]
        (result,) = self._propose_batch([query_idx], pool, [banned], exclude=None)
        return result

    @torch.no_grad()
    def _propose_batch(
        self, ids: list[int], pool: _Pool, banned: list[list[int]], exclude: Tensor | None
    ) -> list[dict[str, list[Candidate]]]:
        """Candidates of queries that share `pool`; `banned`: each query's pool rows never proposed,
        `exclude`: each query's own row in the pool, left out of the attention (None: not in it)."""
        s = self.settings
        for q, rows in zip(ids, banned):
            if pool.size - len(rows) < s.shot_num:
                raise InputError(
                    None,
                    f"query {q}: only {pool.size - len(rows)} pool rows are left after "
                    f"excluding the query (and its image), fewer than shot_num {s.shot_num}",
                )
        generators = [query_generator(s.seed, q) for q in ids]
        noise_size = _num_blocks(pool.size) + _block_size()
        uniforms = torch.stack(
            [
                torch.rand(s.samples_per_query, s.shot_num, noise_size, generator=g, dtype=torch.float64)
                for g in generators
            ]
        )  # drawn first, per query
        randoms = [
            [Candidate(random_rows(g, rows, pool.size, s.shot_num), "random") for _ in range(s.num_random)]
            for g, rows in zip(generators, banned)
        ]
        beams, samples = self._search(ids, pool, banned, exclude, uniforms)
        retrievals = self._retrieve(ids, pool, banned)
        return [dict(zip(METHODS, group)) for group in zip(beams, samples, randoms, retrievals)]

    def _search(self, ids: list[int], pool: _Pool, banned: list[list[int]], exclude: Tensor | None, uniforms: Tensor):
        """Beam search and temperature sampling together: one streaming pool scan per step.

        Each step scores a set of "rows" (`_StepRows`): states whose next-pick distribution is
        needed, already divided by their temperature (logits are linear in the state, so this
        costs nothing over the [rows, K] logits).
        """
        s, dev = self.settings, self.device
        Q = len(ids)
        if s.num_beams == 0 and s.samples_per_query == 0:
            return [[] for _ in ids], [[] for _ in ids]
        base = _pad_rows(banned, pool.size).to(dev)  # [Q, nb], padded with K (never inside a tile)
        state0 = self.model.encode_queries(self.query_emb[ids].to(dev, torch.float32), pool.encoding, exclude=exclude)
        beams = _Beams.start(state0) if s.num_beams else None
        samples = _Samples.start(state0, s.temps, s.num_samples_per_temp) if s.samples_per_query else None
        for t in range(s.shot_num):
            step = self._first_rows(state0, base) if t == 0 else self._later_rows(beams, samples, base, pool.size)
            scan = self._scan_pool(pool, step.rows, step.banned, step.beam_rows, s.num_beams)
            advance = t < s.shot_num - 1
            if beams is not None:
                beams = self._beam_step(pool, scan, step.rows, beams, advance)
            if samples is not None:
                noise = uniforms[:, :, t].to(dev).reshape(len(step.draw_rows), -1, uniforms.shape[3])
                samples = self._sample_step(pool, scan, step, samples, _gumbel(noise), advance)
        return (
            [beams.candidates(i) for i in range(Q)] if beams is not None else [[] for _ in ids],
            [samples.candidates(i, s.temps, s.num_samples_per_temp) for i in range(Q)]
            if samples is not None
            else [[] for _ in ids],
        )

    def _first_rows(self, state0: Tensor, base: Tensor) -> _StepRows:
        """Step 0: every method starts from the query's state; row j * Q + q is query q at temps0[j].

        temps0 = the distinct temperatures needed (1 first when there are beams, then `temps`),
        so the beams read rows [0, Q) and each temperature's samples share one row per query.
        """
        s, Q = self.settings, len(state0)
        sample_temps = list(s.temps) if s.samples_per_query else []
        temps0 = list(dict.fromkeys(([1.0] if s.num_beams else []) + sample_temps))
        first_row = torch.tensor(
            [temps0.index(temp) * Q for temp in sample_temps], dtype=torch.long, device=state0.device
        )
        return _StepRows(
            rows=torch.cat([state0 / temp for temp in temps0]),
            banned=base.repeat(len(temps0), 1),
            beam_rows=Q if s.num_beams else 0,
            draw_rows=(torch.arange(Q, device=state0.device).unsqueeze(1) + first_row).flatten(),  # (q, T) order
        )

    def _later_rows(self, beams: _Beams | None, samples: _Samples | None, base: Tensor, pool_size: int) -> _StepRows:
        """Later steps: the beams' rows (query-major, T = 1), then one row per sample (at its T)."""
        rows, banned = [], []
        if beams is not None:
            rows.append(beams.state)
            banned.append(_with_picks(base, beams.seq))
        if samples is not None:
            rows.append(samples.state / samples.temp.unsqueeze(1))
            banned.append(_with_picks(base, samples.seq))
        nb = len(beams.state) if beams is not None else 0
        all_rows = torch.cat(rows)
        return _StepRows(
            rows=all_rows,
            banned=_cat_padded(banned, pool_size),
            beam_rows=nb,
            draw_rows=torch.arange(nb, len(all_rows), device=base.device),
        )

    def _scan_pool(self, pool: _Pool, rows: Tensor, banned: Tensor, beam_rows: int, k: int) -> _Scan:
        """One pass over the pool in tiles: per-block log-sum-exp of every row, top-k of the first `beam_rows`."""
        K = pool.size
        block = _block_size()
        block_lse = []
        top = _RunningTopK(beam_rows, min(k, K), rows.device)
        for start in range(0, K, SCAN_CHUNK):
            stop = min(start + SCAN_CHUNK, K)
            logits = self.model.step_logits(rows, pool.encoding, rows=slice(start, stop))  # [R, c]
            _mask_tile(logits, banned, start)
            if beam_rows:
                top.update(logits[:beam_rows], start)
            block_lse.append(_block_logsumexp(logits, block))
        return _Scan(block_lse=torch.cat(block_lse, dim=1), block=block, top_values=top.values, top_indices=top.indices)

    def _beam_step(self, pool: _Pool, scan: _Scan, rows: Tensor, beams: _Beams, advance: bool) -> _Beams:
        """Extend every beam by its best rows, keep the best `num_beams` per query (top-k over beams x k).

        The beams' rows are the first Q x slots rows of the step (query-major), at T = 1.
        """
        Q, slots = beams.logp.shape
        lse = torch.logsumexp(scan.block_lse[: Q * slots], dim=1, keepdim=True)  # [Q*slots, 1]
        step_logp = scan.top_values - lse  # [Q*slots, k]
        k = step_logp.shape[1]
        total = (beams.logp.reshape(-1, 1) + step_logp).reshape(Q, slots * k)
        total.masked_fill_(total.isnan(), float("-inf"))  # a dead slot whose row has nothing left
        best, flat = total.topk(min(self.settings.num_beams, slots * k), dim=1)
        parent = flat // k  # [Q, B'] slot of the extended beam
        picked = scan.top_indices.reshape(Q, slots * k).gather(1, flat)
        step_prob = step_logp.reshape(Q, slots * k).gather(1, flat).exp()
        seq = beams.seq.gather(1, parent.unsqueeze(2).expand(-1, -1, beams.seq.shape[2]))
        state = beams.state
        if advance:
            parent_rows = (parent + torch.arange(Q, device=parent.device).unsqueeze(1) * slots).flatten()
            state = self.model.advance(rows[parent_rows], picked.flatten(), pool.encoding)
        return _Beams(
            seq=torch.cat([seq, picked.unsqueeze(2)], dim=2),
            logp=best,
            prob=beams.prob.gather(1, parent) + step_prob,
            state=state,
        )

    def _sample_step(
        self, pool: _Pool, scan: _Scan, step: _StepRows, samples: _Samples, gumbel: Tensor, advance: bool
    ) -> _Samples:
        """One more pick for every sample, drawn with the given noise [draw rows, picks per row, ...]."""
        Q, S = samples.logp.shape
        picks, logp = self._draw(pool, step, scan, gumbel)
        picks, logp = picks.reshape(Q, S), logp.reshape(Q, S)  # same (T, sample) order at every step
        state = self.model.advance(samples.state, picks.flatten(), pool.encoding) if advance else samples.state
        return _Samples(
            seq=torch.cat([samples.seq, picks.unsqueeze(2)], dim=2),
            logp=samples.logp + logp,
            state=state,
            temp=samples.temp,
        )

    def _draw(self, pool: _Pool, step: _StepRows, scan: _Scan, gumbel: Tensor) -> tuple[Tensor, Tensor]:
        """Draws [V, n] from the (tempered) distributions of `step.draw_rows`, and their log-probs.

        Two-level Gumbel-max with the noise `gumbel` [V, n, blocks + block]: level 1 picks the
        block, argmax of (block log-mass + noise); level 2 recomputes that block's logits for that
        one row and picks argmax of (logit + noise) inside it. Each level is an exact draw, and
        unlike an inverse CDF (where the cumulative sum of all earlier rows' rounding decides) a
        pick changes only if two noisy scores tie to within rounding: batch-size-dependent
        rounding of the logits then (almost) never changes a sample.
        """
        block_lse = scan.block_lse[step.draw_rows]  # [V, blocks]
        n_blocks = block_lse.shape[1]
        lse = torch.logsumexp(block_lse, dim=1)  # [V]
        blocks = (block_lse.double().unsqueeze(1) + gumbel[:, :, :n_blocks]).argmax(dim=2)  # [V, n]
        picks = torch.empty_like(blocks)
        logps = torch.empty(blocks.shape, device=blocks.device)
        for v, j in itertools.product(range(blocks.shape[0]), range(blocks.shape[1])):
            block, row = int(blocks[v, j]), int(step.draw_rows[v])
            start = block * scan.block
            logits = self.model.step_logits(
                step.rows[row : row + 1], pool.encoding, rows=slice(start, min(start + scan.block, pool.size))
            )
            _mask_tile(logits, step.banned[row : row + 1], start)
            local = int((logits[0].double() + gumbel[v, j, n_blocks : n_blocks + logits.shape[1]]).argmax())
            picks[v, j] = start + local
            logps[v, j] = logits[0, local] - lse[v]
        return picks, logps

    def _retrieve(self, ids: list[int], pool: _Pool, banned: list[list[int]]) -> list[list[Candidate]]:
        """The retrieval candidates (module docstring): top sets of rows by summed raw cosine."""
        n, shot = self.settings.num_retrieval, self.settings.shot_num
        if n == 0:
            return [[] for _ in ids]
        queries = F.normalize(self.query_emb[torch.tensor(ids)].float(), dim=1)
        sims = (queries @ pool.emb.float().T) / pool.norms  # [Q, K]
        result = []
        for i, rows in enumerate(banned):
            sims[i, rows] = float("-inf")
            top = min(n + shot - 1, pool.size - len(rows))  # the best n sets use only these rows
            if math.comb(top, shot) > MAX_RETRIEVAL_SETS:
                raise InputError(
                    None,
                    f"num_retrieval {n} with shot_num {shot} would enumerate "
                    f"{math.comb(top, shot)} sets; use fewer retrieval candidates",
                )
            values, order = sims[i].topk(top)
            values, order = values.tolist(), order.tolist()
            best = heapq.nsmallest(
                n, itertools.combinations(range(top), shot), key=lambda ranks: (-sum(values[r] for r in ranks), ranks)
            )
            result.append([Candidate(tuple(order[r] for r in ranks), "retrieval") for ranks in best])
        return result


# -- helpers ---------------------------------------------------------------------------------


class _RunningTopK:
    """The k largest values (and pool rows) of each row seen so far, updated tile by tile.

    A tile can only contribute if its row maximum beats the row's current k-th value; after the
    first tiles that is rare, so most tiles cost one max instead of a top-k.
    """

    def __init__(self, n: int, k: int, device: torch.device):
        self.k = k
        self.values = torch.full((n, k), float("-inf"), device=device)
        self.indices = torch.zeros((n, k), dtype=torch.long, device=device)

    def update(self, logits: Tensor, start: int) -> None:
        hit = (logits.amax(dim=1) > self.values[:, -1]).nonzero().squeeze(1)
        if len(hit) == 0:
            return
        values, local = logits[hit].topk(min(self.k, logits.shape[1]), dim=1)
        merged, which = torch.cat([self.values[hit], values], dim=1).topk(self.k, dim=1)
        self.values[hit] = merged
        self.indices[hit] = torch.cat([self.indices[hit], local + start], dim=1).gather(1, which)


class ImageGroups:
    """Which training rows share an image, for `exclude_same_image`."""

    def __init__(self, image_ids: Sequence[int], pool_size: int):
        ids = torch.as_tensor(list(image_ids), dtype=torch.long)
        if ids.shape != (pool_size,):
            raise InputError(None, f"image_ids has {ids.numel()} entries, the pool has {pool_size} rows")
        self.ids = ids
        self.sorted_ids, self.order = torch.sort(ids, stable=True)

    def rows_like(self, row: int) -> list[int]:
        image = self.ids[row]
        lo = int(torch.searchsorted(self.sorted_ids, image))
        hi = int(torch.searchsorted(self.sorted_ids, image, right=True))
        return self.order[lo:hi].tolist()


def banned_rows(query_idx: int, image_groups: ImageGroups | None) -> list[int]:
    """Global rows never proposed for (nor put in the pool of) a query: itself, and its image's rows
    when `exclude_same_image` asks (`image_groups` given)."""
    rows = {query_idx}
    if image_groups is not None:
        rows.update(image_groups.rows_like(query_idx))
    return sorted(rows)


def _check_embeddings(model: PointerSelectorV2, query_emb: Tensor, cand_emb: Tensor) -> None:
    for name, emb in (("query_emb", query_emb), ("cand_emb", cand_emb)):
        if emb.dim() != 2 or emb.shape[1] != model.input_dim:
            raise InputError(
                None, f"{name} must be [N, {model.input_dim}] (the model's input dim), got {list(emb.shape)}"
            )


def _pad_rows(rows: list[list[int]], pad: int) -> Tensor:
    """Ragged lists of pool rows as one tensor, padded with `pad` (the pool size: masks nothing)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def _with_picks(base: Tensor, seq: Tensor) -> Tensor:
    """Banned rows [Q * n, nb + t] of n partial sequences per query: the query's own, then the picks."""
    return torch.cat([base.repeat_interleave(seq.shape[1], dim=0), seq.flatten(0, 1)], dim=1)


def _cat_padded(parts: list[Tensor], pad: int) -> Tensor:
    """Stack [*, n_i] banned-row tensors of different widths, padding with `pad`."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=pad) for p in parts])


def _block_size() -> int:
    """Pool rows per block of the sampling statistics; a divisor of SCAN_CHUNK, so no block straddles tiles."""
    return math.gcd(SCAN_CHUNK, DRAW_BLOCK)


def _num_blocks(pool_size: int) -> int:
    return -(-pool_size // _block_size())


def _gumbel(uniforms: Tensor) -> Tensor:
    """Standard Gumbel noise from uniforms in [0, 1)."""
    return -torch.log(-torch.log(uniforms.clamp_min(1e-300)))


def _block_logsumexp(logits: Tensor, block: int) -> Tensor:
    """Log-sum-exp [R, ceil(c / block)] of each run of `block` columns of a tile [R, c]."""
    full = logits.shape[1] // block * block
    parts = [torch.logsumexp(logits[:, :full].reshape(len(logits), -1, block), dim=2)] if full else []
    if full < logits.shape[1]:
        parts.append(torch.logsumexp(logits[:, full:], dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


def _mask_tile(logits: Tensor, banned: Tensor, start: int) -> None:
    """Set -inf where a row's banned pool rows fall inside the tile [start, start + width)."""
    local = banned - start
    inside = (local >= 0) & (local < logits.shape[1])
    rows, cols = inside.nonzero(as_tuple=True)
    logits[rows, local[rows, cols]] = float("-inf")


def random_rows(generator: torch.Generator, banned: Sequence[int], pool_size: int, shot: int) -> tuple[int, ...]:
    """`shot` distinct rows of 0..pool_size-1 drawn uniformly among those not banned, in draw order
    (exact, no rejection loop).

    Draw r uniform in [0, free rows) and map it to the r-th free row by stepping over the
    blocked rows in ascending order.
    """
    picked: list[int] = []
    for _ in range(shot):
        blocked = sorted(set(banned).union(picked))
        r = int(torch.randint(pool_size - len(blocked), (1,), generator=generator))
        for b in blocked:
            if b > r:
                break
            r += 1
        picked.append(r)
    return tuple(picked)


def _deduplicate(query_idx: int, groups: list[list[Candidate]], pool: tuple[int, ...] | None = None) -> QueryProposals:
    """Keep the first candidate of each ordered sequence (groups come in priority order)."""
    seen: set[tuple[int, ...]] = set()
    kept: list[Candidate] = []
    dropped = dict.fromkeys(METHODS, 0)
    for candidate in itertools.chain.from_iterable(groups):
        if candidate.pointer in seen:
            dropped[candidate.gen_method] += 1
        else:
            seen.add(candidate.pointer)
            kept.append(candidate)
    return QueryProposals(query_idx=query_idx, candidates=kept, duplicates_dropped=dropped, pool=pool)
