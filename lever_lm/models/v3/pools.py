"""Candidate pools: the global pool, or one pool per query (docs/formats.md §7).

Why. The lineage's SFT pointer learnt to choose among the 64-row pools of its beam data's
sampler, and its query state attends over the whole pool it is given: over all 9,009 (or
443,757) training rows its input is unlike anything it saw in training. With `pool="per_query"`
each query is proposed over its own pool alone (`Proposer(..., per_query=True)`), the
candidates' pointers are positions in that pool, and the record carries the pool itself
(`candidate_pool_ids`, global rows in pool order).

Where a query's pool comes from (`sampler`):
  cache  the lineage's sampler cache: a JSON object {str(query row): [pool rows]}. Every pool of
         the run is read and checked before any model is loaded (`load_sampler_cache`).
  rand   `pool_size` rows drawn uniformly without repetition, in draw order, from the query's own
         generator (`query_generator(seed, query, "pools")`: a stream apart from its proposals').
  sim    the `pool_size` rows whose raw embeddings have the largest cosine with the query's
         embedding, nearest first (ties: the lower row first).
A pool never holds its query. The two samplers also skip every row of the query's image under
`exclude_same_image`; rows of a cached pool that share the query's image stay in the pool (it is
the lineage's), and the proposals mask them.

Sampler pools are made when their proposal block is proposed, so a 443,757-query run does not
spend its first hour on pools; what can go wrong with them (a query without `pool_size` rows to
choose from) is checked for every query up front. `sim` cosines are computed for a whole block at
once; like the pointer's scores they are fixed by the block layout, which is part of the run's
fingerprint.

The sampler caches themselves come from the lineage's samplers, `lever_lm.models.v3.samplers`
(stage `sample_pools`), which write them with `save_sampler_cache`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lever_lm.errors import InputError
from lever_lm.io import atomic_output, read_json
from lever_lm.models.v3.proposals import ImageGroups, banned_rows, query_generator, random_rows

log = logging.getLogger(__name__)

POOL_MODES = ("global", "per_query")
SAMPLERS = ("cache", "rand", "sim")
DEFAULT_POOL_SIZE = 64  # the lineage's "k64"
POOL_STREAM = "pools"  # `query_generator` stream of the rand sampler


@dataclass(frozen=True)
class PoolSettings:
    """Which pool each query's candidates come from; validated on creation.

    `sampler` None means: `cache` when `sampler_cache` is given, else `rand`. In global mode the
    other fields are not used (nor read, nor part of the fingerprint).
    """

    pool: str = "global"
    pool_size: int = DEFAULT_POOL_SIZE
    sampler: str | None = None
    sampler_cache: Path | None = None

    def __post_init__(self) -> None:
        if self.sampler is None:
            object.__setattr__(self, "sampler", "cache" if self.sampler_cache else "rand")
        if self.pool not in POOL_MODES:
            raise InputError(None, f"--pool must be one of {', '.join(POOL_MODES)}, got {self.pool!r}")
        if self.sampler not in SAMPLERS:
            raise InputError(None, f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pool_size < 1:
            raise InputError(None, f"--pool_size must be >= 1, got {self.pool_size}")
        if self.sampler == "cache" and not self.sampler_cache:
            raise InputError(None, "--sampler cache needs --sampler_cache (the lineage's sampler cache JSON)")

    @property
    def per_query(self) -> bool:
        return self.pool == "per_query"

    def describe(self) -> dict:
        """The settings that shape a result (for the fingerprint; the cache's content is added there)."""
        if not self.per_query:
            return {"pool": "global"}
        return {"pool": "per_query", "pool_size": self.pool_size, "sampler": self.sampler}


class QueryPools:
    """Every query's pool (global rows, pool order) in a run with per-query pools."""

    size: int

    def pools_of(self, queries: Sequence[int]) -> list[tuple[int, ...]]:
        raise NotImplementedError


class CachedPools(QueryPools):
    """Pools read from a sampler cache (already checked)."""

    def __init__(self, pools: dict[int, tuple[int, ...]], size: int):
        self.pools, self.size = pools, size

    def pools_of(self, queries: Sequence[int]) -> list[tuple[int, ...]]:
        return [self.pools[int(q)] for q in queries]


class RandomPools(QueryPools):
    """`size` rows drawn uniformly without repetition from the query's own generator."""

    def __init__(self, size: int, num_items: int, seed: int, image_groups: ImageGroups | None):
        self.size, self.num_items, self.seed, self.image_groups = size, num_items, seed, image_groups

    def pools_of(self, queries: Sequence[int]) -> list[tuple[int, ...]]:
        return [
            random_rows(query_generator(self.seed, q, POOL_STREAM), banned_rows(q, self.image_groups),
                        self.num_items, self.size)
            for q in map(int, queries)
        ]  # fmt: skip


class SimilarPools(QueryPools):
    """The `size` rows nearest to the query by raw-embedding cosine, nearest first.

    The cosines of a block are one [B, N] matmul on `device` (at N = 443,757 a block of 32 costs
    ~3 s on two CPU cores); the embeddings move there at the first block, so a run that only
    merges shards never touches the device.
    """

    def __init__(
        self, size: int, query_emb: Tensor, cand_emb: Tensor, image_groups: ImageGroups | None, device: str = "cpu"
    ):
        self.size, self.query_emb, self.cand_emb, self.image_groups = size, query_emb, cand_emb, image_groups
        self.device = torch.device(device)
        self._cand: tuple[Tensor, Tensor] | None = None  # rows and their norms, on the device

    @torch.no_grad()
    def pools_of(self, queries: Sequence[int]) -> list[tuple[int, ...]]:
        ids = [int(q) for q in queries]
        if not ids:
            return []
        if self._cand is None:
            cand = self.cand_emb.to(self.device, torch.float32)
            self._cand = cand, cand.norm(dim=1).clamp_min(1e-12)
        cand, norms = self._cand
        queries_unit = F.normalize(self.query_emb[ids].to(self.device, torch.float32), dim=1)
        sims = ((queries_unit @ cand.T) / norms).cpu()  # [B, N]
        return [_nearest(row, banned_rows(q, self.image_groups), self.size) for q, row in zip(ids, sims)]


def _nearest(sims: Tensor, banned: list[int], size: int) -> tuple[int, ...]:
    """The `size` rows of largest `sims` outside `banned`, by decreasing value, ties by lower row.

    topk alone would leave the order of tied rows (duplicate embeddings are common) unspecified:
    take every row above the size-th value, then the tied rows at that value in row order.
    """
    sims = sims.clone()
    sims[banned] = float("-inf")
    threshold = sims.topk(size).values[-1]
    above = (sims > threshold).nonzero().squeeze(1).tolist()
    tied = (sims == threshold).nonzero().squeeze(1).tolist()[: size - len(above)]
    values = sims.tolist()
    return tuple(sorted(above + tied, key=lambda r: (-values[r], r)))


# -- building the pools of a run -----------------------------------------------------------------


def load_pools(
    settings: PoolSettings,
    queries: Sequence[int],
    shot_num: int,
    image_ids: Sequence[int],
    exclude_same_image: bool,
    seed: int,
    query_emb: Tensor,
    cand_emb: Tensor,
    device: str = "cpu",
) -> QueryPools | None:
    """The pools of the run's `queries` (None in global mode), every problem an InputError up front.

    `device`: where `sim` computes its cosines."""
    if not settings.per_query:
        return None
    num_items = len(image_ids)
    if settings.pool_size < shot_num:
        raise InputError(
            None,
            f"--pool_size {settings.pool_size} is smaller than shot_num {shot_num}: "
            "a pool must hold every ICD of a candidate",
        )
    if settings.sampler == "cache":
        pools = load_sampler_cache(settings.sampler_cache, queries, num_items, settings.pool_size)
        _check_cached_pools_leave_enough(settings.sampler_cache, pools, image_ids, exclude_same_image, shot_num)
        log.info("per-query pools of %d rows from the sampler cache %s", settings.pool_size, settings.sampler_cache)
        return CachedPools(pools, settings.pool_size)
    check_enough_rows(queries, image_ids, exclude_same_image, settings.pool_size)
    groups = ImageGroups(image_ids, num_items) if exclude_same_image else None
    note = f" (the sampler cache {settings.sampler_cache} is not used)" if settings.sampler_cache else ""
    log.info("per-query pools of %d rows from the %s sampler%s", settings.pool_size, settings.sampler, note)
    if settings.sampler == "rand":
        return RandomPools(settings.pool_size, num_items, seed, groups)
    return SimilarPools(settings.pool_size, query_emb, cand_emb, groups, device)


def load_sampler_cache(
    path: Path, queries: Sequence[int], num_items: int, pool_size: int
) -> dict[int, tuple[int, ...]]:
    """The pool of every query from a sampler cache {str(query row): [pool rows]}, checked.

    Problems (each an InputError naming the file): a query without a pool, a pool that is not a
    list of distinct rows in 0..num_items-1, a pool holding its query, pools of unequal size, a
    size other than `pool_size`. Keys of other queries are not read.
    """
    cache = read_json(path, unique_keys=True)
    missing = [q for q in queries if str(q) not in cache]
    if missing:
        head = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise InputError(
            path, f"the sampler cache has no pool for {len(missing)} of the {len(queries)} queries ({head})"
        )
    pools: dict[int, tuple[int, ...]] = {}
    for q in queries:
        rows = cache[str(q)]
        if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise InputError(path, f"the pool of query {q} must be a list of row ids (integers)")
        outside = [r for r in rows if not 0 <= r < num_items]
        if outside:
            raise InputError(
                path,
                f"the pool of query {q} has ids outside 0..{num_items - 1} ({outside[:3]}); "
                "pool rows are rows of the training split",
            )
        if q in rows:
            raise InputError(path, f"the pool of query {q} contains the query itself")
        if len(set(rows)) != len(rows):
            raise InputError(path, f"the pool of query {q} repeats a row")
        pools[q] = tuple(rows)
    sizes = Counter(len(p) for p in pools.values())
    if len(sizes) > 1:
        (common, _), (other, _) = sizes.most_common(2)
        example = next(q for q, p in pools.items() if len(p) == other)
        raise InputError(path, f"pools of unequal size: most hold {common} rows, query {example}'s holds {other}")
    size = next(iter(sizes), pool_size)
    if size != pool_size:
        raise InputError(path, f"the pools hold {size} rows, --pool_size says {pool_size} (set --pool_size {size})")
    return pools


def read_sampler_cache(path: Path, num_items: int) -> dict[int, tuple[int, ...]]:
    """Every pool of a sampler cache, in file order, keyed by query row: its keys must be rows of the
    training split, and its pools pass `load_sampler_cache`'s checks (their size is the first's)."""
    cache = read_json(path, unique_keys=True)
    if not cache:
        raise InputError(path, "the sampler cache holds no query")
    for key in cache:
        if not (key.isascii() and key.isdigit()) or str(int(key)) != key or int(key) >= num_items:
            raise InputError(path, f"key {key!r} is not a row of the training split (0..{num_items - 1})")
    first = next(iter(cache.values()))
    size = len(first) if isinstance(first, list) else 0
    return load_sampler_cache(path, [int(key) for key in cache], num_items, size)


def _check_cached_pools_leave_enough(
    path: Path, pools: dict[int, tuple[int, ...]], image_ids: Sequence[int], exclude_same_image: bool, shot_num: int
) -> None:
    """Under exclude_same_image, the rows of a pool that share the query's image are masked: enough must be left."""
    if not exclude_same_image:
        return
    for q, rows in pools.items():
        left = sum(1 for r in rows if image_ids[r] != image_ids[q])
        if left < shot_num:
            raise InputError(
                path,
                f"the pool of query {q} has {left} rows of other images, fewer than shot_num "
                f"{shot_num} (--exclude_same_image masks the rest)",
            )


def check_enough_rows(queries: Sequence[int], image_ids: Sequence[int], exclude_same_image: bool, size: int) -> None:
    """A sampler needs `size` rows besides the query (and its image's rows) for every query."""
    per_image = Counter(image_ids) if exclude_same_image else None
    for q in queries:
        left = len(image_ids) - (per_image[image_ids[q]] if per_image is not None else 1)
        if left < size:
            what = "the query and its image's rows" if per_image is not None else "the query"
            raise InputError(
                None,
                f"query {q}: only {left} rows are left for its pool after excluding {what}, "
                f"fewer than --pool_size {size}",
            )


# -- writing a sampler cache ---------------------------------------------------------------------


def save_sampler_cache(pools: dict[int, Sequence[int]], path: Path) -> None:
    """A sampler cache in the lineage's format: {str(query row): [pool rows]}, one query per line."""
    lines = ",\n".join(f"{json.dumps(str(q))}: {json.dumps(list(rows))}" for q, rows in pools.items())
    with atomic_output(path) as tmp:
        tmp.write_text("{\n" + lines + "\n}\n", encoding="utf-8")
