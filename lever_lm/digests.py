"""Content digests of files, file sets and directories, cached by file identity as DVC does.

Everything that shapes a result is identified by the sha256 of its content, never by its name or
size: a fine-tuned model has the same config and file sizes as its base, and must not reuse the
base model's scores. Hashing a 7 GB model or 83k COCO images at every start would cost minutes,
so each file's digest is cached under (absolute path, size, mtime_ns, inode): a file whose
identity is unchanged is not read again. Any write to a file changes its mtime, so a changed file
is always re-read. The cache is an SQLite database in `$LEVER_LM_CACHE_DIR` (default
`$XDG_CACHE_HOME/lever_lm`, i.e. `~/.cache/lever_lm`); when it cannot be used, digests are simply
computed every time.

Cost of a first hash: about 1 s per GB (sha256 on one core, file in the page cache); a cached
lookup is a `stat` and an indexed SELECT (~20 us).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "LEVER_LM_CACHE_DIR"
HASH_CHUNK = 1 << 22
MISSING = "missing"

_connection: sqlite3.Connection | None = None
_connection_path: Path | None = None


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lever_lm"


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's content; from the cache when the file's identity is unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    connection = _cache()
    if connection is not None:
        row = connection.execute(
            "SELECT digest FROM digests WHERE path = ? AND size = ? AND mtime_ns = ? AND inode = ?", key
        ).fetchone()
        if row is not None:
            return row[0]
    digest = _hash_file(path)
    if connection is not None:
        try:
            with connection:
                connection.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)", (*key, digest))
        except sqlite3.Error as error:
            log.debug("digest cache not updated: %s", error)
    return digest


def files_digest(paths: Iterable[Path], root: Path) -> str:
    """One digest for a set of files under `root`: their relative names and contents (a missing
    file counts as such, so a file appearing later changes the digest)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted({Path(p) for p in paths}):
        content = file_digest(path) if path.is_file() else MISSING
        digest.update(f"{path.relative_to(root).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def directory_digest(directory: str | Path) -> str:
    """One digest for every regular file under `directory` (recursively; hidden files included)."""
    directory = Path(directory)
    return files_digest((p for p in directory.rglob("*") if p.is_file()), directory)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cache() -> sqlite3.Connection | None:
    """The process's connection to the digest cache (None when it cannot be opened)."""
    global _connection, _connection_path
    path = cache_dir() / "digests.sqlite"
    if _connection is not None and _connection_path == path:
        return _connection
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30)
        with connection:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS digests (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER, "
                "digest TEXT, PRIMARY KEY (path))"
            )
    except (OSError, sqlite3.Error) as error:
        log.warning("digest cache %s unavailable (%s); hashing inputs without it", path, error)
        return None
    _connection, _connection_path = connection, path
    return connection
