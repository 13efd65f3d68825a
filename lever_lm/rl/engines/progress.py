"""The driver's one progress bar, shared by the engines: finished queries, candidates per second."""

from __future__ import annotations

import time

from tqdm import tqdm

from lever_lm.rl.blocks import QueryResult


class Progress:
    """Counts finished queries on one bar, with the work per second (candidates, prompts: `unit`) of
    every worker together."""

    def __init__(self, total: int, enabled: bool = True, workers: int | None = None, unit: str = "cand"):
        self.bar = tqdm(total=total, unit="query", disable=not enabled, dynamic_ncols=True)
        self.started = time.time()
        self.work = 0
        self.workers = workers
        self.unit = unit

    def done(self, result: QueryResult) -> None:
        self.work += result.work
        self.bar.update(1)
        postfix = {f"{self.unit}_per_s": f"{self.work / max(time.time() - self.started, 1e-9):.1f}"}
        if self.workers is not None:
            postfix["workers"] = self.workers
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
