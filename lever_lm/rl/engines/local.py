"""The local engine: one process runs the shard's blocks one after another and journals each query."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lever_lm.rl.blocks import QueryResult, blocks_of
from lever_lm.rl.engines.progress import Progress
from lever_lm.rl.job import BlockRunner


def run_local(
    scorer: BlockRunner,
    queries: Sequence[int],
    todo: set[int],
    block_size: int,
    on_result: Callable[[QueryResult], None],
    progress: bool = True,
    unit: str = "cand",
) -> None:
    """Score every block of `queries` that holds a query of `todo`; hand each result to `on_result`
    (the journal) as soon as it is finished. Blocks are cut from all of `queries`, so a block is
    proposed whole even when only part of it is to do."""
    with Progress(len(todo), enabled=progress, unit=unit) as bar:
        for block in blocks_of(queries, block_size):
            for result in scorer.run(block, todo):
                on_result(result)
                bar.done(result)
