"""A job's final JSON (RL data, docs/formats.md §5; beam data, §3.2), written from journals, with its
counts and sha256.

The final file is an object keyed by `str(query_idx)` in beam-data key order, one query per line
(`{\\n"12": {...},\\n"40": {...}\\n}`): valid JSON that the GRPO trainer reads with `json.load`, yet
streamable, so a VQAv2-sized file never has to sit in memory. Entries are copied from the journals
(each line checked when the journal is indexed, and again by its checksum when copied). The file
is written to a temporary name and renamed, so it is never half-written.

A query whose own image could not be read has no real scores, so it is left out of the file
(a group of zeros would look like data); the meta sidecar (`lever_lm.rl.meta`) and the log name
it and the reason. The sidecar also holds the sha256 of the bytes written here.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lever_lm.errors import InputError
from lever_lm.io import atomic_output
from lever_lm.rl.job import Totals
from lever_lm.rl.journal import JournalSpec, read_entry, read_index
from lever_lm.rl.meta import meta_path_for
from lever_lm.rl.records import MethodTotals


@dataclass
class FinalCounts:
    """What the final file holds, for the log and the meta sidecar (`totals`: the job's counts)."""

    totals: Totals = field(default_factory=MethodTotals)
    unscorable: dict[int, str] = field(default_factory=dict)  # query -> why it is left out
    sha256: str = ""  # of the file's bytes

    def as_dict(self) -> dict:
        return {**self.totals.as_dict(), "unscorable_queries": {str(q): r for q, r in self.unscorable.items()}}


def collect_journal_index(journals: Sequence[tuple[Path, JournalSpec]]) -> dict[int, tuple[Path, int]]:
    """query_idx -> (journal, offset of its latest line) across shard journals, every line checked."""
    index: dict[int, tuple[Path, int]] = {}
    for path, spec in journals:
        if not path.is_file():
            raise InputError(path, "shard journal not found: run that shard first")
        for query_idx, offset in read_index(path, spec).offsets.items():
            index[query_idx] = (path, offset)  # shards hold disjoint queries (checked by read_index)
    return index


def write_final_json(
    output_path: Path, query_order: Sequence[int], index: dict[int, tuple[Path, int]], totals: Totals | None = None
) -> FinalCounts:
    """Write the final JSON for `query_order` from the journals; return its counts and sha256
    (`totals`: the job's counts, by default the RL data's `MethodTotals`).

    Journaled queries outside `query_order` (e.g. beyond --limit) are simply not written.
    """
    missing = [q for q in query_order if q not in index]
    if missing:
        head = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(output_path, f"{len(missing)} queries not journaled yet ({head}); finish every shard first")
    handles: dict[Path, object] = {}
    counts, digest = FinalCounts() if totals is None else FinalCounts(totals), hashlib.sha256()
    try:
        with atomic_output(output_path) as tmp, open(tmp, "wb") as out:

            def write(text: str) -> None:
                data = text.encode("utf-8")
                digest.update(data)
                out.write(data)

            write("{")
            written = 0
            for query_idx in query_order:
                journal, offset = index[query_idx]
                handle = handles.get(journal) or handles.setdefault(journal, open(journal, "rb"))
                record = read_entry(handle, offset)
                if record["stats"].get("query_error"):
                    counts.unscorable[query_idx] = record["stats"]["query_error"]
                    continue
                separator = ",\n" if written else "\n"
                written += 1
                entry = json.dumps(record["entry"], ensure_ascii=False, allow_nan=False)
                write(f"{separator}{json.dumps(str(query_idx))}: {entry}")
                counts.totals.add(record["entry"], record["stats"])
            write("\n}\n")
    finally:
        for handle in handles.values():
            handle.close()
    counts.sha256 = digest.hexdigest()
    return counts


class _Probe(Exception):
    """Ends a probing `atomic_output` before it replaces anything."""


def check_output_names(output_path: Path) -> None:
    """Create, and remove at once, the temporary file of the longest name the run writes beside the
    output (the sidecar's), as the final write will, in the output's directory or its nearest
    existing ancestor: a name too long for the file system fails now, before any work, not after
    it. Other problems of the location are `request.check_output_location`'s to report."""
    directory = output_path.parent
    while not directory.exists() and directory.parent != directory:
        directory = directory.parent
    if not directory.is_dir():
        return
    try:
        with atomic_output(directory / meta_path_for(output_path).name):
            raise _Probe
    except _Probe:
        pass
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            return
        raise InputError(
            output_path,
            f"the file name ({len(output_path.name)} characters) is too long for this file system once the "
            "run adds its suffixes (the '.meta.json' sidecar and its temporary file); use a shorter --output_path",
        ) from None
