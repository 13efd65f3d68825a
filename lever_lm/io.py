"""Reading JSON inputs, and atomic file output.

`read_json` is the one JSON reader of the project's inputs: a missing file, bad JSON (nesting too
deep for the parser included: `parse_json`), the wrong top-level type or (where asked) a key
written twice is an `InputError` naming the file. A repeated
key matters: `json.load` would silently keep the last value, so a hand-edited file could change a
result without a word.

Everything the project writes (embeddings, checkpoints, beam data, the RL data and its metadata,
metrics) goes through `atomic_output`: the content is written to a temporary file in the target's
own directory and renamed over the target only when complete, so a crash never leaves a
half-written file for a user or DVC to trust.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lever_lm.errors import InputError


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
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary readable files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
