"""Content digests: cached by file identity (ctime included), never fooled, never stopped by the cache."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest

from lever_lm import digests


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A fresh cache directory and a fresh process-wide cache object (as in a new process)."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(digests.CACHE_ENV, str(directory))
    monkeypatch.setattr(digests, "_CACHE", digests.DigestCache())
    monkeypatch.setattr(digests, "RECENT_SECONDS", 0.0)  # files written by the test itself are cached at once
    return directory


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The files hashed (read) from now on."""
    seen: list[str] = []
    original = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda p: seen.append(os.fspath(p)) or original(p))
    return seen


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_process(monkeypatch) -> None:
    monkeypatch.setattr(digests, "_CACHE", digests.DigestCache())


def write_files(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img_{i:04d}.jpg" for i in range(count)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(f"image {i}".encode() * 50)
    return names


def test_an_unchanged_file_is_not_read_again(cache, reads, tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    assert digests.file_digest(path) == sha(b"a" * 100) and reads == [str(path)]
    new_process(monkeypatch)
    assert digests.file_digest(path) == sha(b"a" * 100) and len(reads) == 1


def test_new_content_with_the_old_size_and_mtime_is_read_again(cache, reads, tmp_path):
    """`cp` + `touch -r` (also `cp -p`, `rsync -t`): size, mtime and inode stay, the ctime moves."""
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "model.safetensors"
    path.write_bytes(b"a" * 100)
    before = path.stat()
    assert digests.file_digest(path) == sha(b"a" * 100)
    model = digests.directory_digest(tmp_path / "model")
    time.sleep(0.05)  # past a tick of the file system's coarse clock
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert after.st_ctime_ns != before.st_ctime_ns
    assert digests.directory_digest(tmp_path / "model") != model  # the model swap is seen
    assert digests.file_digest(path) == sha(b"b" * 100) and len(reads) == 2


def test_a_file_changed_just_now_is_hashed_but_not_cached(cache, reads, tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "RECENT_SECONDS", 3600.0)
    path = tmp_path / "w.bin"
    path.write_bytes(b"a")
    assert digests.file_digest(path) == digests.file_digest(path) == sha(b"a")
    assert len(reads) == 2


def test_a_folder_digest_covers_names_and_contents_and_missing_files(cache, reads, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    names = write_files(folder, 100)
    expected = digests._set_digest((n, sha((folder / n).read_bytes())) for n in sorted(names))
    assert digests.files_digest(names, folder) == expected and len(reads) == 100
    absolute = [folder / n for n in reversed(names)]
    assert digests.files_digest(absolute, folder) == expected and len(reads) == 100  # cached
    new_process(monkeypatch)
    assert digests.files_digest(names, folder) == expected and len(reads) == 100  # warm: no file read
    with_missing = digests.files_digest([*names, "late.jpg"], folder)
    assert with_missing != expected
    (folder / "late.jpg").write_bytes(b"x")
    assert digests.files_digest([*names, "late.jpg"], folder) not in (expected, with_missing)
    nested = digests.files_digest(["a/b.bin"], tmp_path)
    assert nested == digests._set_digest([("a/b.bin", digests.MISSING)])


def test_a_directory_digest_walks_every_regular_file(cache, tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / ".hidden").write_text("h")
    (model / "sub" / "weights.bin").write_bytes(b"w" * 10)
    (tmp_path / "blob").write_bytes(b"linked")
    (model / "link.bin").symlink_to(tmp_path / "blob")  # as in a hub cache snapshot
    expected = digests.files_digest(["config.json", ".hidden", "sub/weights.bin", "link.bin"], model)
    assert digests.directory_digest(model) == expected
    (model / "sub" / "weights.bin").write_bytes(b"v" * 10)
    assert digests.directory_digest(model) != expected


def test_a_damaged_cache_is_rebuilt_with_one_warning(cache, tmp_path, monkeypatch, caplog):
    folder = tmp_path / "images"
    names = write_files(folder, 400)
    expected = digests.files_digest(names, folder)
    database = cache / digests.CACHE_FILE
    assert database.stat().st_size > 20480
    with open(database, "r+b") as handle:  # bytes 4096..20479 overwritten: "database disk image is malformed"
        handle.seek(4096)
        handle.write(os.urandom(16384))
    new_process(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lever_lm.digests"):
        assert digests.files_digest(names, folder) == expected
        assert digests.file_digest(folder / names[0]) == sha((folder / names[0]).read_bytes())
    assert len(caplog.records) == 1 and "damaged" in caplog.text and "rebuilt" in caplog.text
    with sqlite3.connect(database) as connection:  # rebuilt and filled again
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("SELECT count(*) FROM files").fetchone() == (400,)


def test_a_file_that_is_not_a_database_is_rebuilt(cache, tmp_path, monkeypatch, caplog):
    cache.mkdir()
    (cache / digests.CACHE_FILE).write_bytes(os.urandom(8192))
    folder = tmp_path / "images"
    names = write_files(folder, 50)
    with caplog.at_level(logging.WARNING, logger="lever_lm.digests"):
        digest = digests.files_digest(names, folder)
    assert len(caplog.records) == 1 and "rebuilt" in caplog.text
    new_process(monkeypatch)
    assert digests.files_digest(names, folder) == digest


def test_an_unusable_cache_is_bypassed_with_one_warning(tmp_path, monkeypatch, caplog, reads):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    monkeypatch.setenv(digests.CACHE_ENV, str(not_a_directory))
    new_process(monkeypatch)
    folder = tmp_path / "images"
    names = write_files(folder, 300)
    with caplog.at_level(logging.WARNING, logger="lever_lm.digests"):
        first = digests.files_digest(names, folder)
        assert digests.files_digest(names, folder) == first
        assert digests.file_digest(folder / names[1]) == sha((folder / names[1]).read_bytes())
    assert len(caplog.records) == 1 and "without it" in caplog.text
    assert len(reads) == 601  # every file hashed each time, nothing cached


def test_a_damaged_row_is_never_trusted(cache, reads, tmp_path, monkeypatch, caplog):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    digests.file_digest(path)
    with sqlite3.connect(cache / digests.CACHE_FILE) as connection:
        connection.execute("UPDATE files SET digest = ?", ("0" * 64,))
    new_process(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lever_lm.digests"):
        assert digests.file_digest(path) == sha(b"a" * 100)
    assert len(reads) == 2 and "damaged entries" in caplog.text


def test_a_cache_of_the_previous_layout_is_replaced_quietly(cache, tmp_path, caplog):
    cache.mkdir()
    with sqlite3.connect(cache / digests.CACHE_FILE) as connection:  # (path, size, mtime_ns, inode) keys
        connection.execute(
            "CREATE TABLE digests (path TEXT, size INTEGER, mtime_ns INTEGER, inode INTEGER, digest TEXT, "
            "PRIMARY KEY (path))"
        )
        connection.execute("INSERT INTO digests VALUES ('/x', 1, 1, 1, 'stale')")
    connection.close()
    path = tmp_path / "w.bin"
    path.write_bytes(b"a")
    with caplog.at_level(logging.WARNING, logger="lever_lm.digests"):
        assert digests.file_digest(path) == sha(b"a")
    assert not caplog.records
    with sqlite3.connect(cache / digests.CACHE_FILE) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"files"}
