"""The local engine: one process scores the shard's blocks one after another and journals each query."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

from lever_lm.rl.blocks import BlockScorer, QueryResult, blocks_of


def run_local(
    scorer: BlockScorer,
    queries: Sequence[int],
    todo: set[int],
    block_size: int,
    on_result: Callable[[QueryResult], None],
    progress: bool = True,
) -> None:
    """Score every block of `queries` that holds a query of `todo`; hand each result to `on_result`
    (the journal) as soon as it is finished. Blocks are cut from all of `queries`, so a block is
    proposed whole even when only part of it is to do."""
    bar = tqdm(total=len(todo), unit="query", disable=not progress, dynamic_ncols=True)
    started, candidates = time.time(), 0
    try:
        for block in blocks_of(queries, block_size):
            for result in scorer.run(block, todo):
                on_result(result)
                candidates += len(result.entry["pointer_candidates"])
                bar.update(1)
                bar.set_postfix(cand_per_s=f"{candidates / max(time.time() - started, 1e-9):.1f}")
    finally:
        bar.close()
