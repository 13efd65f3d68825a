"""The append-only JSONL journal that makes RL data generation resumable (SPEC §5, Checkpointing).

One line per finished query: `{"query_idx": int, "entry": {...}, "stats": {...}}`, written,
flushed and fsynced before the next query is journaled, so a `kill -9` loses at most the work in
flight. Journals live in a directory keyed by a *fingerprint* of everything that shapes the result
(settings, input files, model, prompt): `<journal_dir>/<fingerprint>/shard-<i>-of-<n>.jsonl`, with
`settings.json` beside it saying what the fingerprint stands for. A run with other settings gets its
own directory while older progress stays resumable; switching back resumes it.

A journal is opened under an exclusive, non-blocking `flock` on `<journal>.lock`: a second writer is
refused, and the lock dies with its process (nothing stale to clean up after a crash). On open, a
torn last line (the process died mid-write) is truncated away; a bad line anywhere else is
corruption and an error.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lever_lm.errors import InputError

FINGERPRINT_LENGTH = 16


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of a JSON-serialisable settings dict (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


def shard_file_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id}-of-{num_shards}.jsonl"


class Journal:
    """An open, locked journal file of one shard of one fingerprint."""

    def __init__(self, path: Path, lock_handle: IO[str], handle: IO[bytes], offsets: dict[int, int]):
        self.path = path
        self._lock_handle = lock_handle
        self._handle = handle
        self._offsets = offsets  # query_idx -> byte offset of its line

    @classmethod
    def open(cls, directory: Path, shard_id: int = 0, num_shards: int = 1, settings: dict | None = None) -> "Journal":
        """Open (creating if needed) and lock the shard's journal; repair a torn last line."""
        directory.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            _write_settings(directory, settings)
        path = directory / shard_file_name(shard_id, num_shards)
        lock_handle = _acquire_lock(path.with_suffix(".lock"))
        try:
            offsets = _repair_and_index(path)
            handle = open(path, "ab")
        except BaseException:
            lock_handle.close()
            raise
        return cls(path, lock_handle, handle, offsets)

    def done(self) -> set[int]:
        """Query indices already journaled."""
        return set(self._offsets)

    def append(self, query_idx: int, entry: dict, stats: dict | None = None) -> None:
        """Journal one finished query durably (write, flush, fsync)."""
        if query_idx in self._offsets:
            raise ValueError(f"query {query_idx} is already in {self.path}")
        record = {"query_idx": query_idx, "entry": entry, "stats": stats or {}}
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        offset = self._handle.tell()
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._offsets[query_idx] = offset

    def close(self) -> None:
        self._handle.close()
        self._lock_handle.close()  # releases the flock

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: Path) -> Iterator[dict]:
    """Every complete record of a journal file, in file order (a torn last line is skipped)."""
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                return
            yield json.loads(line)


def index_records(path: Path) -> dict[int, int]:
    """query_idx -> byte offset of its line, for reading entries back in any order."""
    offsets: dict[int, int] = {}
    offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            offsets[json.loads(line)["query_idx"]] = offset
            offset += len(line)
    return offsets


def read_record_at(handle: IO[bytes], offset: int) -> dict:
    handle.seek(offset)
    return json.loads(handle.readline())


def _acquire_lock(lock_path: Path) -> IO[str]:
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise InputError(
            lock_path.with_suffix(".jsonl"),
            f"journal is in use by another run (pid {holder}); two writers cannot share a journal",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _repair_and_index(path: Path) -> dict[int, int]:
    """Index complete lines; truncate a torn (unterminated or unparsable) LAST line."""
    offsets: dict[int, int] = {}
    if not path.exists():
        return offsets
    good_end = 0
    with open(path, "rb") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines):
        is_last = number == len(lines) - 1
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated line")
            record = json.loads(line)
            query_idx = int(record["query_idx"])
            record["entry"]
        except (ValueError, KeyError, TypeError) as error:
            if is_last:
                break
            raise InputError(path, f"line {number + 1} is corrupt ({error}); delete the journal to start over") from None
        offsets[query_idx] = good_end
        good_end += len(line)
    if good_end < path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(good_end)
            handle.flush()
            os.fsync(handle.fileno())
    return offsets


def _write_settings(directory: Path, settings: dict) -> None:
    path = directory / "settings.json"
    if path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- maintenance: list and prune journal directories ------------------------------------------


def list_journals(journal_dir: Path) -> list[dict]:
    """One summary per fingerprint directory: queries journaled per shard, last change."""
    summaries = []
    for directory in sorted(p for p in journal_dir.iterdir() if p.is_dir()) if journal_dir.is_dir() else []:
        shards = {p.name: len(index_records(p)) for p in sorted(directory.glob("shard-*.jsonl"))}
        mtimes = [p.stat().st_mtime for p in directory.iterdir()]
        summaries.append({"fingerprint": directory.name, "shards": shards, "modified": max(mtimes, default=0.0)})
    return summaries


def prune_journals(journal_dir: Path, keep: set[str]) -> list[str]:
    """Delete every fingerprint directory not in `keep` (and not locked by a running job)."""
    removed = []
    for summary in list_journals(journal_dir):
        name = summary["fingerprint"]
        directory = journal_dir / name
        if name in keep or _is_locked(directory):
            continue
        shutil.rmtree(directory)
        removed.append(name)
    return removed


def _is_locked(directory: Path) -> bool:
    for lock_path in directory.glob("*.lock"):
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def main(argv: list[str] | None = None) -> None:
    """`python -m lever_lm.rl.journal list|prune JOURNAL_DIR [--keep FP ...]`."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description="List or prune RL generation journals.")
    parser.add_argument("action", choices=["list", "prune"])
    parser.add_argument("journal_dir", type=Path)
    parser.add_argument("--keep", nargs="*", default=[], help="fingerprints to keep when pruning")
    args = parser.parse_args(argv)
    if args.action == "list":
        for summary in list_journals(args.journal_dir):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary["modified"]))
            shards = ", ".join(f"{k}: {v} queries" for k, v in summary["shards"].items()) or "empty"
            print(f"{summary['fingerprint']}  {when}  {shards}")
    else:
        removed = prune_journals(args.journal_dir, set(args.keep))
        print(f"removed {len(removed)} journal(s): {' '.join(removed) or '-'}", file=sys.stdout)


if __name__ == "__main__":
    main()
