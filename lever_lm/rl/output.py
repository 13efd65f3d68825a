"""The final RL data JSON (SPEC §5), written from journals, and its `<output>.meta.json` sidecar.

The final file is an object keyed by `str(query_idx)` in beam-data key order, one query per line
(`{\n"12": {...},\n"40": {...}\n}`): valid JSON that the GRPO trainer reads with `json.load`, yet
streamable, so a VQAv2-sized file never has to sit in memory. Entries are copied from the journals
by byte offset. The file is written to a temporary name and renamed, so it is never half-written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lever_lm.io import atomic_output
from lever_lm.errors import InputError
from lever_lm.rl.journal import index_records, read_record_at


def collect_journal_index(journals: Sequence[Path]) -> dict[int, tuple[Path, int]]:
    """query_idx -> (journal, offset) across shard journals; a query in two journals is an error."""
    index: dict[int, tuple[Path, int]] = {}
    for journal in journals:
        if not journal.is_file():
            raise InputError(journal, "shard journal not found: run that shard first")
        for query_idx, offset in index_records(journal).items():
            if query_idx in index:
                raise InputError(journal, f"query {query_idx} is also in {index[query_idx][0]}: shards overlap")
            index[query_idx] = (journal, offset)
    return index


def write_final_json(output_path: Path, query_order: Sequence[int], index: dict[int, tuple[Path, int]]) -> dict:
    """Write the final JSON for exactly `query_order` from the journals; return summary counts."""
    missing = [q for q in query_order if q not in index]
    if missing:
        head = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(output_path, f"{len(missing)} queries not journaled yet ({head}); finish every shard first")
    extra = set(index) - set(query_order)
    if extra:
        raise InputError(output_path, f"journals hold {len(extra)} queries that are not in the beam data")
    handles = {}
    totals = RunTotals()
    try:
        with atomic_output(output_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.write("{")
            for position, query_idx in enumerate(query_order):
                journal, offset = index[query_idx]
                handle = handles.get(journal) or handles.setdefault(journal, open(journal, "rb"))
                record = read_record_at(handle, offset)
                separator = "\n" if position == 0 else ",\n"
                out.write(f"{separator}{json.dumps(str(query_idx))}: {json.dumps(record['entry'], ensure_ascii=False)}")
                totals.add(record["entry"], record.get("stats", {}))
            out.write("\n}\n")
    finally:
        for handle in handles.values():
            handle.close()
    return totals.as_dict()


class RunTotals:
    """Counts over the written queries: candidates, failures, duplicates, accuracy by method."""

    def __init__(self) -> None:
        self.queries = self.candidates = self.failed = 0
        self.duplicates: dict[str, int] = {}
        self.method_count: dict[str, int] = {}
        self.method_accuracy: dict[str, float] = {}

    def add(self, entry: dict, stats: dict) -> None:
        self.queries += 1
        for candidate in entry["pointer_candidates"]:
            method = candidate["gen_method"]
            self.candidates += 1
            self.failed += bool(candidate.get("eval_failed"))
            self.method_count[method] = self.method_count.get(method, 0) + 1
            self.method_accuracy[method] = self.method_accuracy.get(method, 0.0) + candidate["vqa_acc_score"]
        for method, n in stats.get("duplicates_dropped", {}).items():
            self.duplicates[method] = self.duplicates.get(method, 0) + n

    def as_dict(self) -> dict:
        return {
            "queries": self.queries,
            "candidates": self.candidates,
            "failed": self.failed,
            "duplicates_dropped": dict(sorted(self.duplicates.items())),
            "by_method": {
                m: {"candidates": n, "accuracy": self.method_accuracy[m] / n} for m, n in sorted(self.method_count.items())
            },
        }


def write_meta(output_path: Path, meta: dict) -> Path:
    """The run metadata sidecar `<output>.meta.json` (kept out of the data file, SPEC §5)."""
    meta_path = meta_path_for(output_path)
    with atomic_output(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return meta_path


def meta_path_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".meta.json")
