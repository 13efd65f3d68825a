"""The append-only JSONL journal that makes RL data generation resumable (docs/formats.md §6).

A journal file belongs to one shard of one *fingerprint* (a hash of everything that shapes the
result): `<journal_dir>/<fingerprint>/shard-<i>-of-<n>.jsonl`, with `settings.json` beside it
saying what the fingerprint stands for. Its first line is a header naming the fingerprint, the
shard, the settings and what the first run pinned; every further line is one finished query:

    {"journal": "lever_lm.rl", "version": 3, "fingerprint": "...", "shard": [i, n],
     "rules": {"shot_num": 2, "num_items": 9009[, "pool_size": 64]}, "settings": {...},
     "queries": [the shard's query rows], "pinned": {"batch_size": 16, "torch_threads": 2}}
    {"query_idx": 12, "attempt": 0, "entry": {...}, "stats": {...}, "sha256": "<16 hex>"}

Each line is written, flushed and fsynced before the next query is journaled, so a `kill -9`
loses at most the work in flight. `sha256` is a checksum of the fingerprint, the shard and the
line's other bytes: an edit or a flipped byte inside a string is caught, not used, and so is a
line copied from the journal of another run or shard (another model, seed or eval mode).

`pinned` holds what shapes the output's last bits without being part of the fingerprint (`Pins`):
the VQA batch size and, on a CPU, the torch thread count. The header is written when the first
run knows them (after its model is loaded), and every resume scores with them.

Nothing read back is trusted. On open, every line is checked: the header must be this run's (a
journal copied from other settings is refused), each record must be one of the shard's queries,
follow its job's record schema (the header's `rules`: `lever_lm.rl.records` for RL data,
`lever_lm.infoscore.records` for beam data) and match its checksum. A query may appear again only
as a later `attempt` of an incomplete result (a retried failed evaluation); the latest attempt
counts. A torn last line (the process died mid-write) is truncated away; a bad line anywhere else
is an error naming the file and line, with the way out: `python -m lever_lm.rl.journal repair
FILE` drops the bad lines (their queries are recomputed), or delete the journal.

A journal is opened under an exclusive, non-blocking `flock` on `<journal>.lock`: a second writer is
refused, and the lock dies with its process (nothing stale to clean up after a crash).

Lines are read and written with the standard `json` module rather than the `jsonlines` package:
the journal needs the byte offset of each line (the final JSON copies entries by offset), a
checksum of the exact bytes written, torn-tail detection and an fsync per line, none of which
`jsonlines` offers; it would only wrap the same `json.dumps`/`json.loads` calls.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lever_lm.errors import InputError, exit_on_input_error
from lever_lm.infoscore.records import BeamRules
from lever_lm.io import atomic_output, parse_json
from lever_lm.rl.fingerprints import fingerprint
from lever_lm.rl.records import RecordRules

# What a journal's records must look like: the RL data's `RecordRules` or the beam data's `BeamRules`
# (each: `header()`, `problems(query_idx, entry, stats)`, `needs_retry(entry, stats)`, `from_header`).
JournalRules = RecordRules | BeamRules

FORMAT = "lever_lm.rl"
VERSION = 3  # 3: line checksums cover the fingerprint and shard; the header pins batch size and threads
CHECKSUM_LENGTH = 16


def shard_file_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id}-of-{num_shards}.jsonl"


@dataclass(frozen=True)
class Pins:
    """What a journal's first run scored with that shapes the output's bytes but not its meaning: the
    VQA batch size (a prompt's batch-mates and padding) and, on a CPU, the torch thread count (float32
    reductions). Both move `vqa_gt_prob` (and the beam data's InfoScores) in their last bits on a CPU, and
    can flip a bf16 answer or a ranking tie on a GPU."""

    batch_size: int
    torch_threads: int | None = None  # None off the CPU

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "torch_threads": self.torch_threads}

    @classmethod
    def from_header(cls, value: object) -> Pins | None:
        """The header's `pinned` (None: written without pins); ValueError when it is malformed."""
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) != {"batch_size", "torch_threads"}:
            raise ValueError("the header's 'pinned' must be {batch_size, torch_threads}")
        batch_size, threads = value["batch_size"], value["torch_threads"]
        if not _positive_int(batch_size) or not (threads is None or _positive_int(threads)):
            raise ValueError(f"the header's 'pinned' holds {value!r}; expected positive integers")
        return cls(batch_size, threads)

    def describe(self) -> str:
        threads = "" if self.torch_threads is None else f", {self.torch_threads} torch thread(s)"
        return f"batch size {self.batch_size}{threads}"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class JournalSpec:
    """What a journal file must be: whose settings, which shard and queries, what records look like."""

    settings: dict
    queries: tuple[int, ...]  # the shard's queries (all of them, whatever --limit says)
    rules: JournalRules
    shard_id: int = 0
    num_shards: int = 1

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    @property
    def binding(self) -> str:
        """What every line's checksum covers besides the line: whose journal it is."""
        return line_binding(self.fingerprint, self.shard_id, self.num_shards)

    @functools.cached_property
    def query_set(self) -> frozenset[int]:
        return frozenset(self.queries)

    def header(self) -> dict:
        return {
            "journal": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "shard": [self.shard_id, self.num_shards],
            "rules": self.rules.header(),
            "settings": self.settings,
            "queries": list(self.queries),
        }

    @classmethod
    def from_header(cls, header: object) -> JournalSpec:
        """The spec a header states (ValueError when it is not a header)."""
        try:
            assert isinstance(header, dict) and header.get("journal") == FORMAT
            shard_id, num_shards = header["shard"]
            rules = rules_from_header(header["rules"])
            return cls(header["settings"], tuple(header["queries"]), rules, int(shard_id), int(num_shards))
        except (AssertionError, KeyError, TypeError, ValueError):
            raise ValueError("the first line is not a journal header") from None


def rules_from_header(rules: dict) -> JournalRules:
    """The record rules a header's `rules` state: beam data's name their job, RL data's (as before) do not."""
    return BeamRules.from_header(rules) if rules.get("job") == BeamRules.JOB else RecordRules.from_header(rules)


@dataclass
class JournalIndex:
    """The latest line of every query in a journal file."""

    offsets: dict[int, int] = field(default_factory=dict)  # query_idx -> byte offset of its latest line
    attempts: dict[int, int] = field(default_factory=dict)
    incomplete: set[int] = field(default_factory=set)  # latest attempt still holds failures
    good_end: int = 0  # bytes of complete, valid lines (a torn tail starts here)
    pins: Pins | None = None  # from the header (None: no header yet, or one written without pins)


class Journal:
    """An open, locked journal file of one shard of one fingerprint."""

    def __init__(
        self, path: Path, spec: JournalSpec, lock_handle: IO[str], handle: IO[bytes] | None, index: JournalIndex
    ):
        self.path = path
        self.spec = spec
        self._lock_handle = lock_handle
        self._handle = handle  # None until the header is written
        self._index = index

    @classmethod
    def open(cls, directory: Path, spec: JournalSpec) -> Journal:
        """Open and lock the shard's journal; check every line; drop a torn tail. A new journal's
        header is written by `pin` (or the first `append`)."""
        directory.mkdir(parents=True, exist_ok=True)
        _write_settings(directory, spec.settings)
        path = directory / shard_file_name(spec.shard_id, spec.num_shards)
        lock_handle = _acquire_lock(path.with_suffix(".lock"))
        try:
            index = read_index(path, spec) if path.exists() else JournalIndex()
            _truncate_torn_tail(path, index)
            handle = open(path, "ab") if index.good_end else None
        except BaseException:
            lock_handle.close()
            raise
        return cls(path, spec, lock_handle, handle, index)

    @property
    def pins(self) -> Pins | None:
        """What the journal's first run pinned (None: a new journal, nothing pinned yet)."""
        return self._index.pins

    def pin(self, pins: Pins) -> None:
        """Record what this run scores with: in the header of a new journal; an existing journal's pins
        must be the same (the caller scores with `self.pins` when there are any)."""
        if self._handle is None:
            self._write_header(pins)
        elif self._index.pins is not None and pins != self._index.pins:
            raise InputError(
                self.path,
                f"the journal was written with {self._index.pins.describe()}; this run scores with "
                f"{pins.describe()}, which would change the output's bytes",
            )

    def done(self) -> set[int]:
        """Queries whose latest result is final (no failed evaluation to retry)."""
        return set(self._index.offsets) - self._index.incomplete

    def incomplete(self) -> set[int]:
        """Queries journaled with failed evaluations: a new run retries them."""
        return set(self._index.incomplete)

    def append(self, query_idx: int, entry: dict, stats: dict | None = None) -> None:
        """Journal one finished query durably (write, flush, fsync): a first result or a retry."""
        if query_idx in self.done():
            raise ValueError(f"query {query_idx} is already final in {self.path}")
        if self._handle is None:
            self._write_header(None)
        attempt = self._index.attempts.get(query_idx, -1) + 1
        record = {"query_idx": query_idx, "attempt": attempt, "entry": entry, "stats": stats or {}}
        offset = self._handle.tell()
        _write_line(self._handle, record_line(record, self.spec.binding))
        self._index.offsets[query_idx] = offset
        self._index.attempts[query_idx] = attempt
        if self.spec.rules.needs_retry(entry, record["stats"]):
            self._index.incomplete.add(query_idx)
        else:
            self._index.incomplete.discard(query_idx)

    def _write_header(self, pins: Pins | None) -> None:
        header = {**self.spec.header(), "pinned": None if pins is None else pins.as_dict()}
        handle = open(self.path, "ab")
        try:
            _write_line(handle, json.dumps(header, ensure_ascii=False, separators=(",", ":")))
        except BaseException:
            handle.close()
            raise
        self._handle, self._index.pins = handle, pins

    def close(self) -> None:
        try:
            if self._handle is not None:
                self._handle.close()
        finally:
            self._lock_handle.close()  # releases the flock, even when the last flush failed

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def line_binding(fingerprint_: str, shard_id: int, num_shards: int) -> str:
    return f"{fingerprint_} shard {shard_id} of {num_shards}"


def line_checksum(binding: str, body: bytes) -> str:
    """The checksum of a record's JSON `body` in the journal that `binding` names."""
    return hashlib.sha256(binding.encode("utf-8") + b"\n" + body).hexdigest()[:CHECKSUM_LENGTH]


def record_line(record: dict, binding: str) -> str:
    """A record as one line of the journal `binding` names: its JSON with its checksum appended."""
    body = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f'{body[:-1]},"sha256":"{line_checksum(binding, body.encode("utf-8"))}"}}'


def parse_record(line: bytes, binding: str) -> dict:
    """A line of the journal `binding` names, parsed and its checksum verified (over the exact bytes
    written); ValueError saying what is wrong otherwise."""
    record = parse_json(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    checksum = record.pop("sha256", None)
    text = line.rstrip(b"\n")
    tail = f',"sha256":"{checksum}"}}'.encode("utf-8")
    if not (isinstance(checksum, str) and text.endswith(tail)) or checksum != line_checksum(
        binding, text[: -len(tail)] + b"}"
    ):
        raise ValueError("checksum mismatch (the line was edited or damaged, or comes from another run's journal)")
    query_idx, attempt = record.get("query_idx"), record.get("attempt")
    for name, value in (("query_idx", query_idx), ("attempt", attempt)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"'{name}' must be a non-negative integer, found {value!r}")
    if not isinstance(record.get("entry"), dict) or not isinstance(record.get("stats"), dict):
        raise ValueError("'entry' and 'stats' must be objects")
    return record


def read_index(path: Path, spec: JournalSpec) -> JournalIndex:
    """Check a journal file line by line against `spec`; index the latest line of every query.

    A torn (unterminated) last line is left out of the index (`good_end` stops before it); any
    other bad line is an InputError naming the file, the line and the fix.
    """
    index = JournalIndex()
    with open(path, "rb") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.endswith(b"\n"):
            if number == len(lines):
                break  # torn by a crash mid-write
            raise _corrupt(path, number, "unterminated line")
        try:
            if number == 1:
                index.pins = _check_header(line, spec)
            else:
                _index_record(parse_record(line, spec.binding), index, index.good_end, spec)
        except ValueError as error:
            raise _corrupt(path, number, str(error)) from None
        except ForeignJournal as error:
            raise InputError(
                path, f"{error}; it cannot be used for this run: delete it or use another --journal_dir"
            ) from None
        index.good_end += len(line)
    return index


class ForeignJournal(Exception):
    """The journal's header names other settings or another shard."""


def _check_header(line: bytes, spec: JournalSpec) -> Pins | None:
    """The header's pins, once the header is found to be `spec`'s."""
    header = _parse_header(line)
    if header.get("fingerprint") != spec.fingerprint or header.get("settings") != spec.settings:
        raise ForeignJournal(f"the journal was written with other settings (fingerprint {header.get('fingerprint')})")
    pinned = header.pop("pinned", None)
    if header != spec.header():
        raise ForeignJournal(f"the journal belongs to another shard or query list (shard {header.get('shard')})")
    return Pins.from_header(pinned)


def _parse_header(line: bytes) -> dict:
    """A journal header of this version (ValueError: not a header; ForeignJournal: another version)."""
    try:
        header = parse_json(line)
    except ValueError:
        raise ValueError("the first line is not a journal header") from None
    if not isinstance(header, dict) or header.get("journal") != FORMAT:
        raise ValueError("the first line is not a journal header")
    if header.get("version") != VERSION:
        older = isinstance(header.get("version"), int) and header["version"] < VERSION
        why = " (an older lever_lm's, whose line checksums do not name their run)" if older else ""
        raise ForeignJournal(f"journal format version {header.get('version')!r}{why}, this program reads {VERSION}")
    return header


def _index_record(record: dict, index: JournalIndex, offset: int, spec: JournalSpec) -> None:
    query_idx, attempt = record["query_idx"], record["attempt"]
    if query_idx in index.offsets:
        if query_idx not in index.incomplete:
            raise ValueError(f"query {query_idx} appears twice")
        if attempt != index.attempts[query_idx] + 1:
            raise ValueError(f"query {query_idx}: attempt {attempt} follows attempt {index.attempts[query_idx]}")
    elif attempt != 0:
        raise ValueError(f"query {query_idx}: attempt {attempt} without the earlier ones")
    if query_idx not in spec.query_set:
        raise ValueError(f"query {query_idx} is not one of this shard's queries")
    problems = list(spec.rules.problems(query_idx, record["entry"], record["stats"]))
    if problems:
        raise ValueError("; ".join(problems[:3]))
    index.offsets[query_idx] = offset
    index.attempts[query_idx] = attempt
    if spec.rules.needs_retry(record["entry"], record["stats"]):
        index.incomplete.add(query_idx)
    else:
        index.incomplete.discard(query_idx)


def _corrupt(path: Path, number: int, problem: str) -> InputError:
    return InputError(
        path,
        f"line {number} is corrupt ({problem}); drop the bad lines with "
        f"`python -m lever_lm.rl.journal repair {path}` (their queries are recomputed), or delete the journal",
    )


def read_pins(path: Path) -> Pins | None:
    """What a journal file's header pinned (read from its first line alone; `read_index` checks it)."""
    with open(path, "rb") as handle:
        return Pins.from_header(_parse_header(handle.readline()).get("pinned"))


def read_entry(handle: IO[bytes], offset: int) -> dict:
    """The record at `offset` of an indexed (hence checked) journal file, its checksum verified again."""
    binding = _BINDINGS.get(handle)
    if binding is None:  # the file's own header, checked when the file was indexed; read once per handle
        handle.seek(0)
        binding = _BINDINGS.setdefault(handle, JournalSpec.from_header(parse_json(handle.readline())).binding)
    handle.seek(offset)
    return parse_record(handle.readline(), binding)


_BINDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # open journal file -> its line binding


def _write_line(handle: IO[bytes], text: str) -> None:
    handle.write((text + "\n").encode("utf-8"))
    handle.flush()
    os.fsync(handle.fileno())


def _truncate_torn_tail(path: Path, index: JournalIndex) -> None:
    if path.exists() and index.good_end < path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(index.good_end)
            handle.flush()
            os.fsync(handle.fileno())


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


def _write_settings(directory: Path, settings: dict) -> None:
    """`settings.json`, the readable copy of what the directory's fingerprint stands for."""
    path = directory / "settings.json"
    if path.exists():
        try:
            same = parse_json(path.read_text(encoding="utf-8")) == settings
        except ValueError:
            same = False
        if same:
            return
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# -- maintenance: list, repair and prune journal directories ----------------------------------


def summarise_file(path: Path) -> str:
    """`N of M queries` for a readable shard journal, else where it is damaged (never raises)."""
    try:
        spec = _spec_of_file(path)
        index = read_index(path, spec)
    except InputError as error:
        return f"corrupt: {error.problem.split(';')[0]}"
    return f"{len(index.offsets)} of {len(spec.queries)} queries"


def _spec_of_file(path: Path) -> JournalSpec:
    """The spec a journal file's own header states; InputError when the header is damaged or of
    another format version (its lines cannot be checked)."""
    with open(path, "rb") as handle:
        first = handle.readline()
    try:
        return JournalSpec.from_header(_parse_header(first))
    except ValueError:
        raise InputError(path, "line 1 is corrupt (no valid journal header)") from None
    except ForeignJournal as error:
        raise InputError(path, f"{error}: delete it, its queries are recomputed") from None


def list_journals(journal_dir: Path) -> list[dict]:
    """One summary per fingerprint directory: what each shard file holds, last change."""
    summaries = []
    for directory in sorted(p for p in journal_dir.iterdir() if p.is_dir()) if journal_dir.is_dir() else []:
        shards = {p.name: summarise_file(p) for p in sorted(directory.glob("shard-*.jsonl"))}
        mtimes = [p.stat().st_mtime for p in directory.iterdir()]
        summaries.append({"fingerprint": directory.name, "shards": shards, "modified": max(mtimes, default=0.0)})
    return summaries


def repair_file(path: Path) -> list[int]:
    """Rewrite a shard journal without its bad lines (atomically); return the line numbers dropped.

    Kept: the header and every record that parses, passes its checksum and follows the attempt
    rules. A damaged header cannot be repaired (nothing says which settings the lines belong to).
    """
    spec = _spec_of_file(path)
    with open(path, "rb") as handle:
        lines = handle.readlines()
    index, kept, dropped = JournalIndex(), [lines[0]], []
    for number, line in enumerate(lines[1:], start=2):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated line")
            _index_record(parse_record(line, spec.binding), index, 0, spec)
            kept.append(line)
        except (ValueError, ForeignJournal):
            dropped.append(number)
    if dropped:
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"".join(kept))
    return dropped


def prune_journals(journal_dir: Path, keep: set[str]) -> list[str]:
    """Delete every fingerprint directory not in `keep` (and not locked by a running job)."""
    removed = []
    directories = sorted(p for p in journal_dir.iterdir() if p.is_dir()) if journal_dir.is_dir() else []
    for directory in directories:
        if directory.name in keep or _is_locked(directory):
            continue
        shutil.rmtree(directory)
        removed.append(directory.name)
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
    """`python -m lever_lm.rl.journal list DIR | repair FILE | prune DIR (--keep FP ... | --all)`."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description="List, repair or prune RL generation journals.")
    parser.add_argument("action", choices=["list", "repair", "prune"])
    parser.add_argument("path", type=Path, help="a journal directory (list, prune) or a shard .jsonl file (repair)")
    parser.add_argument("--keep", nargs="+", default=[], help="prune: fingerprints to keep")
    parser.add_argument("--all", action="store_true", help="prune: delete every journal not in use (no --keep)")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        if args.action == "list":
            for summary in list_journals(args.path):
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary["modified"]))
                shards = ", ".join(f"{k}: {v}" for k, v in summary["shards"].items()) or "empty"
                print(f"{summary['fingerprint']}  {when}  {shards}")
        elif args.action == "repair":
            if not args.path.is_file():
                raise InputError(args.path, "not a journal file (give the shard-*.jsonl file to repair)")
            dropped = repair_file(args.path)
            print(f"dropped {len(dropped)} bad line(s): {' '.join(map(str, dropped)) or '-'}")
        else:
            if not args.keep and not args.all:
                raise InputError(None, "prune needs --keep FINGERPRINT ... or --all (deletes every journal)")
            removed = prune_journals(args.path, set(args.keep))
            print(f"removed {len(removed)} journal(s): {' '.join(removed) or '-'}", file=sys.stdout)


if __name__ == "__main__":
    main()
