"""Content digests of files, file sets and directories, cached by file identity.

Everything that shapes a result is identified by the sha256 of its content, never by its name or
size: a fine-tuned model has the same config and file sizes as its base, and must not reuse the
base model's scores. Hashing a 7 GB model or 83k COCO images at every start would cost minutes,
so each file's digest is cached under its identity: absolute path, size, mtime_ns, ctime_ns and
inode. A write changes the mtime; whatever then puts the old mtime back (`touch -r`, `cp -p`,
`rsync -t`, unpacking an archive) changes the ctime, which no user tool can set: the kernel sets
it to the current time at every change of a file's content or metadata. So a changed file is
always read again (and so is a file that was only renamed, chmod-ed or hard-linked: a new hash,
same digest).

A folder of files costs one pass: the files are stat-ed relative to their directory, one at a time,
and the cache is read once per directory. Files not in the cache are hashed by a pool of threads
(sha256 releases the GIL), and their digests are stored every few thousand files, so an
interrupted first hash keeps what it did.

The cache is an SQLite database in `$LEVER_LM_CACHE_DIR` (default `$XDG_CACHE_HOME/lever_lm`,
i.e. `~/.cache/lever_lm`). A file changed in the last RECENT_SECONDS is hashed but not cached (a
second same-size write within one tick of the file system's clock would keep its identity). Each
row carries a CRC of its name and digest: a row damaged on disk is hashed again, never trusted. A
damaged database file is deleted and rebuilt, and one that cannot be used (a read-only or missing
directory, a file where the directory should be, a lock that is never released) is bypassed:
digests are then computed every time. Either is one warning per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from stat import S_ISREG

log = logging.getLogger(__name__)

CACHE_ENV = "LEVER_LM_CACHE_DIR"
CACHE_FILE = "digests.sqlite"
SCHEMA_VERSION = 2  # 1: (path, size, mtime_ns, inode, digest); 2: per directory, with ctime_ns and a row CRC
HASH_CHUNK = 1 << 22
HASH_THREADS = min(8, 2 * (os.cpu_count() or 1))  # a disk (or a network file system) serves several reads at once
STORE_EVERY = 2000  # hashed files between two commits of the cache
ANNOUNCE_FILES = 1000  # hashing at least this many files (or ANNOUNCE_BYTES) is logged, with its rate
ANNOUNCE_BYTES = 1 << 30
MISSING = "missing"
RECENT_SECONDS = 2.0  # file times come from a coarse clock (a few ms per tick): see the module doc


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lever_lm"


# -- the public functions -------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's content; from the cache when the file's identity is unchanged."""
    directory, name = os.path.split(os.path.abspath(path))
    digest = _digests(directory, [name])[0]
    if digest is None:
        os.stat(path)  # the error a caller expects: FileNotFoundError, PermissionError, ...
        raise IsADirectoryError(f"not a regular file: {path}")
    return digest


def files_digest(paths: Iterable[str | Path], root: str | Path) -> str:
    """One digest for a set of files under `root`: their relative names and contents (a missing
    file counts as such, so a file appearing later changes the digest). Each path is absolute
    (under `root`) or relative to `root`; relative names are the cheap way for large sets."""
    root = os.path.abspath(root)
    names = sorted({_relative(os.fspath(p), root) for p in paths})
    by_directory: dict[str, list[str]] = {}
    for name in names:
        directory, _, base = name.rpartition("/")
        by_directory.setdefault(directory, []).append(base)
    contents: dict[str, str] = {}
    for directory, bases in by_directory.items():
        prefix = f"{directory}/" if directory else ""
        found = _digests(os.path.join(root, directory) if directory else root, bases)
        contents.update((prefix + base, digest or MISSING) for base, digest in zip(bases, found))
    return _set_digest([(name, contents[name]) for name in names])


def directory_digest(directory: str | Path) -> str:
    """One digest for every regular file under `directory` (recursively; hidden files included;
    symbolic links to files followed, to directories not)."""
    root = os.path.abspath(directory)
    contents: list[tuple[str, str]] = []
    for relative, entries in _walk(root, ""):
        found = _digests(os.path.join(root, relative) if relative else root, [e.name for e in entries], entries)
        prefix = f"{relative}/" if relative else ""
        contents += [(prefix + entry.name, digest) for entry, digest in zip(entries, found) if digest is not None]
    return _set_digest(sorted(contents))


# -- digests of one directory's files -------------------------------------------------------------

# What the cache keys a digest by, besides the file's path: (size, mtime_ns, ctime_ns, inode).
Identity = tuple[int, int, int, int]


def _digests(directory: str, names: list[str], entries: list[os.DirEntry] | None = None) -> list[str | None]:
    """The digest of each named file in `directory` (None: missing, or not a regular file)."""
    identities = _identities(directory, names, entries)
    digests = _CACHE.lookup(directory, names, identities)
    todo = [k for k, (identity, digest) in enumerate(zip(identities, digests)) if digest is None and identity]
    if todo:
        paths = [os.path.join(directory, names[k]) for k in todo]
        settled = time.time_ns() - int(RECENT_SECONDS * 1e9)
        rows = []
        for k, digest in zip(todo, _hash_files(paths, sum(identities[k][0] for k in todo))):
            digests[k] = digest
            if max(identities[k][1], identities[k][2]) < settled:
                rows.append((names[k], identities[k], digest))
            if len(rows) >= STORE_EVERY:
                _CACHE.store(directory, rows)
                rows = []
        _CACHE.store(directory, rows)
    return digests


def _identities(directory: str, names: list[str], entries: list[os.DirEntry] | None) -> list[Identity | None]:
    """One stat per file, relative to the open directory (no path resolution per file); None for
    a missing file or anything but a regular file."""
    if entries is not None:
        return [_identity(_stat_entry(entry)) for entry in entries]
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return [None] * len(names)
    identities: list[Identity | None] = []
    try:
        for name in names:
            try:
                status = os.stat(name, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                status = None
            identities.append(_identity(status))
    finally:
        os.close(fd)
    return identities


def _stat_entry(entry: os.DirEntry) -> os.stat_result | None:
    try:
        return entry.stat()
    except FileNotFoundError:  # removed since the listing, or a dangling link
        return None


def _identity(status: os.stat_result | None) -> Identity | None:
    if status is None or not S_ISREG(status.st_mode):
        return None
    return (status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)


def _walk(root: str, relative: str) -> Iterator[tuple[str, list[os.DirEntry]]]:
    """(relative directory, its regular-file entries) for `root` and every directory below it."""
    with os.scandir(os.path.join(root, relative) if relative else root) as listing:
        entries = list(listing)
    yield relative, [e for e in entries if not e.is_dir(follow_symlinks=False) and e.is_file()]
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(root, f"{relative}/{entry.name}" if relative else entry.name)


def _relative(path: str, root: str) -> str:
    if not path.startswith("/"):
        return path
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return os.path.relpath(path, root)


def _set_digest(contents: list[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(f"{name}\0{content}\n" for name, content in contents).encode()).hexdigest()


# -- hashing --------------------------------------------------------------------------------------


def _hash_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(paths: list[str], total_bytes: int) -> Iterator[str]:
    """The digests of `paths`, in order, hashed by a pool of threads; a large job is logged."""
    announce = len(paths) >= ANNOUNCE_FILES or total_bytes >= ANNOUNCE_BYTES
    if announce:
        log.info(
            "hashing %d files (%.2f GB) not in the digest cache %s; later starts reuse their digests",
            len(paths),
            total_bytes / 1e9,
            _CACHE.path(),
        )
    started = time.time()
    if len(paths) == 1:
        yield _hash_file(paths[0])
    else:
        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="digest") as pool:
            yield from pool.map(_hash_file, paths)
    if announce:
        seconds = max(time.time() - started, 1e-9)
        log.info("hashed %d files in %.1fs (%.0f MB/s)", len(paths), seconds, total_bytes / 1e6 / seconds)


# -- the cache ------------------------------------------------------------------------------------


def _row_crc(name: str, digest: str) -> int:
    """A row's check: damage to its name or digest is caught here; damage to its identity fields
    only makes it miss (the file is hashed again)."""
    return zlib.crc32(f"{name}\0{digest}".encode())


class DigestCache:
    """The process's connection to the digest cache database, opened on first use.

    Trouble never stops a run: a damaged file ("database disk image is malformed", "file is not
    a database") is deleted and rebuilt; any other failure (the directory cannot be made or
    written, a lock held too long) turns the cache off for the rest of the process. Either is
    said once. A row whose CRC does not match is treated as absent, and overwritten."""

    SELECT_ONE = "SELECT name, size, mtime_ns, ctime_ns, inode, digest, crc FROM files WHERE dir = ? AND name = ?"
    SELECT_ALL = "SELECT name, size, mtime_ns, ctime_ns, inode, digest, crc FROM files WHERE dir = ?"
    ONE_BY_ONE = 64  # up to this many names: one indexed query each; more: the directory's rows at once

    def __init__(self):
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._path: Path | None = None
        self._off: set[Path] = set()  # cache files found unusable in this process
        self._rebuilt: set[Path] = set()
        self._bad_rows_reported = False

    def path(self) -> Path:
        return cache_dir() / CACHE_FILE

    def lookup(self, directory: str, names: list[str], identities: list[Identity | None]) -> list[str | None]:
        """The cached digest of each file whose identity is unchanged (None: not cached, or stale)."""
        if not any(identities):
            return [None] * len(names)
        rows = {row[0]: row for row in self._run(lambda c: self._select(c, directory, names), default=[])}
        digests: list[str | None] = []
        bad = 0
        for name, identity in zip(names, identities):
            row = rows.get(name)
            if row is None or identity is None or row[1:5] != identity:
                digests.append(None)
            elif _row_crc(name, row[5]) != row[6]:
                bad += 1
                digests.append(None)
            else:
                digests.append(row[5])
        if bad and not self._bad_rows_reported:
            self._bad_rows_reported = True
            log.warning("%d damaged entries in the digest cache %s: those files are hashed again", bad, self.path())
        return digests

    def store(self, directory: str, rows: list[tuple[str, Identity, str]]) -> None:
        if not rows:
            return
        values = [(directory, name, *identity, digest, _row_crc(name, digest)) for name, identity, digest in rows]

        def insert(connection: sqlite3.Connection) -> None:
            with connection:
                connection.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)

        self._run(insert, default=None)

    def _select(self, connection: sqlite3.Connection, directory: str, names: list[str]) -> list[tuple]:
        if len(names) <= self.ONE_BY_ONE:
            return [row for name in names for row in connection.execute(self.SELECT_ONE, (directory, name))]
        return connection.execute(self.SELECT_ALL, (directory,)).fetchall()

    def _run(self, work, default):
        """`work(connection)`, or `default` when the cache cannot be used."""
        with self._lock:
            for attempt in range(2):
                connection = self._connect()
                if connection is None:
                    return default
                try:
                    return work(connection)
                except sqlite3.DatabaseError as error:
                    if attempt == 0 and _is_damage(error):
                        self._rebuild(error)
                        continue
                    self._turn_off(error)
                    return default
            return default

    def _connect(self) -> sqlite3.Connection | None:
        path = self.path()
        if self._connection is not None and self._path == path:
            return self._connection
        self._close()
        if path in self._off:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, timeout=30, check_same_thread=False)
        except (OSError, sqlite3.Error) as error:
            self._turn_off(error)
            return None
        self._connection, self._path = connection, path
        try:
            _create_schema(connection)
        except sqlite3.DatabaseError as error:
            if _is_damage(error) and path not in self._rebuilt:
                self._rebuild(error)
                return self._connection
            self._turn_off(error)
            return None
        return connection

    def _rebuild(self, error: sqlite3.DatabaseError) -> None:
        """Delete a damaged cache file and start an empty one (once per file and process)."""
        path = self.path()
        self._close()
        self._rebuilt.add(path)
        try:
            for stale in (path, *(path.with_name(path.name + s) for s in ("-journal", "-wal", "-shm"))):
                stale.unlink(missing_ok=True)
            connection = sqlite3.connect(path, timeout=30, check_same_thread=False)
            _create_schema(connection)
        except (OSError, sqlite3.Error) as second:
            self._turn_off(second, f"damaged ({error}) and could not be rebuilt")
            return
        self._connection, self._path = connection, path
        log.warning("digest cache %s was damaged (%s); rebuilt it empty: files are hashed again once", path, error)

    def _turn_off(self, error: BaseException, what: str | None = None) -> None:
        path = self.path()
        self._close()
        if path not in self._off:
            self._off.add(path)
            log.warning(
                "digest cache %s %s; hashing inputs without it in this run",
                path,
                what or f"cannot be used ({error})",
            )

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except sqlite3.Error:
                pass
        self._connection = None


def _create_schema(connection: sqlite3.Connection) -> None:
    with connection:
        if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            connection.execute("DROP TABLE IF EXISTS digests")  # version 1's table
            connection.execute("DROP TABLE IF EXISTS files")
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute(
            "CREATE TABLE IF NOT EXISTS files (dir TEXT, name TEXT, size INTEGER, mtime_ns INTEGER, "
            "ctime_ns INTEGER, inode INTEGER, digest TEXT, crc INTEGER, PRIMARY KEY (dir, name)) WITHOUT ROWID"
        )


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    """A damaged file ("malformed", "not a database"), as opposed to a lock or a permission problem."""
    return not isinstance(error, sqlite3.OperationalError) or "malformed" in str(error)


_CACHE = DigestCache()
