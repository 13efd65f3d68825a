"""Parsed inputs, cached by the content of the files they are parsed from.

Parsing VQAv2's training annotations (354 MB of JSON) takes many seconds and gigabytes, and every
start would pay it: each shard, each `dvc exp run`. So the columns a parse produces
(`lever_lm.data.columns`) are saved once, as an uncompressed `.npz` of plain arrays, in
`<digest cache dir>/parsed/`. The file is named by the sha256 of the content digests
(`lever_lm.digests`, themselves cached by file identity) of the sources and of the code that
parses them: an edited source or an edited parser gets another name, never a stale parse. Reading
it runs no code (`allow_pickle=False`), and the caller's `decode` checks every array; a file that
fails is parsed again and replaced (one warning). At most KEEP files stay (the least recently
used go first). When the directory cannot be written, the parse is simply not kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from lever_lm.data import columns
from lever_lm.digests import cache_dir, file_digest
from lever_lm.io import atomic_output

log = logging.getLogger(__name__)

KEEP = 6  # parsed files kept (VQAv2's training split: about 60 MB each)
SUBDIR = "parsed"

T = TypeVar("T")
_warned: set[str] = set()


def cached_parse(
    kind: str,
    sources: list[Path],
    parse: Callable[[], dict[str, np.ndarray]],
    decode: Callable[[dict[str, np.ndarray]], T],
    code: Path,
) -> T:
    """`decode(parse())`, with `parse()`'s arrays cached under the content digests of the sources
    and of the code that parses (`code`, the module of `parse`, with this module and the columns').
    `decode` raises ColumnError on arrays that do not fit together."""
    if not all(path.is_file() for path in sources):
        return decode(parse())  # the parse names the missing file
    parser_code = [code, Path(__file__), Path(columns.__file__)]
    key = json.dumps([kind, [file_digest(path) for path in [*sources, *parser_code]]])
    path = cache_dir() / SUBDIR / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    try:
        value = decode(_read(path))
    except OSError:
        pass  # not parsed yet, pruned by another process just now, or a directory that cannot be used
    except (ValueError, EOFError, zipfile.BadZipFile) as error:  # ColumnError is a ValueError
        _warn_once(f"damaged:{path}", "parsed cache file %s is damaged (%s); parsing the sources again", path, error)
    else:
        _touch(path)
        return value
    started = time.time()
    arrays = parse()
    value = decode(arrays)
    _write(path, arrays)
    log.info(
        "parsed %s in %.1fs; kept for later starts in %s", ", ".join(map(str, sources)), time.time() - started, path
    )
    return value


def _read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
        _prune(path.parent)
    except OSError as error:
        _warn_once(f"write:{path.parent}", "cannot keep parsed inputs in %s (%s); each start parses them", path, error)


def _prune(directory: Path) -> None:
    """Keep the KEEP most recently used files (another process may prune at the same time)."""
    files = sorted(directory.glob("*.npz"), key=_last_used, reverse=True)
    for stale in files[KEEP:]:
        stale.unlink(missing_ok=True)


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _touch(path: Path) -> None:
    """Mark a file as used (for `_prune`)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)
