"""Reading JSON inputs, and atomic file output.

`read_json` is the one JSON reader of the project's inputs: a missing file, bad JSON (nesting too
deep for the parser included: `parse_json`), the wrong top-level type or (where asked) a key
written twice is an `InputError` naming the file. A repeated
key matters: `json.load` would silently keep the last value, so a hand-edited file could change a
result without a word.

Everything the project writes (embeddings, checkpoints, beam data, the RL data and its metadata,
metrics) goes through `atomic_output`: the content is written to a temporary file in the target's
own directory and renamed over the target only when complete, so a crash never leaves a
half-written file for a user or DVC to trust. A `kill -9` during the write leaves the temporary file
(`.<name>.<random>.tmp`); the next write of the same target removes it (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lever_lm.errors import InputError

log = logging.getLogger(__name__)


def is_json_number(value: object) -> bool:
    """An int or a float as JSON gives them (a bool is not a number, though Python says it is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_json(text: str | bytes, **kwargs) -> Any:
    """`json.loads`; JSON nested deeper than the parser's limit (Python's recursion limit, about
    1000 levels; no file of the project nests more than 8) is a ValueError like any other bad JSON,
    never a RecursionError."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError(f"nested deeper than {sys.getrecursionlimit()} levels") from None


def read_json(path: str | Path, expect: type = dict, unique_keys: bool = False) -> Any:
    """The parsed JSON file, checked to be an `expect` (dict or list) at the top level."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    hook = _refuse_repeated_keys(path) if unique_keys else None
    try:
        with path.open(encoding="utf-8") as handle:
            data = parse_json(handle.read(), object_pairs_hook=hook)
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(path, f"not valid JSON: {error}") from None
    if not isinstance(data, expect):
        what = "object" if expect is dict else "list" if expect is list else expect.__name__
        raise InputError(path, f"expected a JSON {what}, found {type(data).__name__}")
    return data


def _refuse_repeated_keys(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        result = {}
        for key, value in pairs:
            if key in result:
                raise InputError(path, f"key {key!r} appears twice")
            result[key] = value
        return result

    return hook


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """`torch.save` atomically and byte-reproducibly.

    Saving to a buffer first keeps the archive's internal name fixed ("archive"); saved straight to
    the temporary file it would embed that file's random name, so equal tensors would give
    different bytes (and different DVC hashes) on every run.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    The temporary file is locked (`flock`) while it is written, so that a later write can tell a
    leftover of a killed writer from a file another live process is writing (see below).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: the file is only unprotected
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)  # after the unlink: the name is never seen unlocked while it is ours


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files that killed writes of `path` left beside it; return them.

    Only names `atomic_output(path)` makes (`temporary_name_pattern`; not those of other targets) and
    only unlocked ones: a live writer holds its file's lock until the rename, a killed one lost it
    with its process.
    """
    path = Path(path)
    pattern = temporary_name_pattern(path)
    candidates, removed = [], []
    with contextlib.suppress(FileNotFoundError), os.scandir(path.parent) as entries:
        candidates = [Path(e.path) for e in entries if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    for candidate in candidates:
        if _unlink_if_unlocked(candidate):
            log.info("removed %s, left by a write of %s that was killed", candidate.name, path)
            removed.append(candidate)
    return removed


def temporary_name_pattern(path: str | Path) -> re.Pattern:
    """The names of `atomic_output(path)`'s temporary files: `.<name>.` + mkstemp's 8 random characters + `.tmp`."""
    return re.compile(re.escape(f".{Path(path).name}.") + r"[a-z0-9_]{8}\.tmp")


def _unlink_if_unlocked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone meanwhile, or not ours to read
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:  # locked by its live writer (or gone meanwhile)
        return False
    finally:
        os.close(fd)
    return True
