"""The journal: durable appends, torn-line repair, one writer, fingerprints, pruning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lever_lm.errors import InputError
from lever_lm.rl.journal import Journal, fingerprint, index_records, list_journals, prune_journals, read_records


def test_fingerprint_ignores_key_order_and_changes_with_values():
    assert fingerprint({"a": 1, "b": [1.0, 1.3]}) == fingerprint({"b": [1.0, 1.3], "a": 1})
    assert fingerprint({"a": 1, "b": [1.0, 1.3]}) != fingerprint({"a": 1, "b": [0.7, 1.0, 1.3]})


def test_append_then_reopen_resumes(tmp_path: Path):
    with Journal.open(tmp_path / "fp", settings={"x": 1}) as journal:
        journal.append(5, {"v": 1})
        journal.append(2, {"v": 2}, stats={"seconds": 0.1})
    assert json.loads((tmp_path / "fp" / "settings.json").read_text()) == {"x": 1}
    with Journal.open(tmp_path / "fp") as journal:
        assert journal.done() == {5, 2}
        journal.append(7, {"v": 3})
    records = list(read_records(tmp_path / "fp" / "shard-0-of-1.jsonl"))
    assert [r["query_idx"] for r in records] == [5, 2, 7]
    assert records[1] == {"query_idx": 2, "entry": {"v": 2}, "stats": {"seconds": 0.1}}


def test_torn_last_line_is_truncated(tmp_path: Path):
    with Journal.open(tmp_path) as journal:
        journal.append(1, {"v": 1})
        path = journal.path
    good = path.read_bytes()
    path.write_bytes(good + b'{"query_idx": 2, "entry": {"v"')
    with Journal.open(tmp_path) as journal:
        assert journal.done() == {1}
        journal.append(2, {"v": 2})
    assert [r["query_idx"] for r in read_records(path)] == [1, 2]
    assert index_records(path) == {1: 0, 2: len(good)}


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path: Path):
    with Journal.open(tmp_path) as journal:
        journal.append(1, {"v": 1})
        path = journal.path
    path.write_bytes(b"garbage\n" + path.read_bytes())
    with pytest.raises(InputError, match="line 1 is corrupt"):
        Journal.open(tmp_path)


def test_second_writer_is_refused_even_from_another_process(tmp_path: Path):
    with Journal.open(tmp_path):
        with pytest.raises(InputError, match="in use by another run"):
            Journal.open(tmp_path)
        code = (
            "import sys; from pathlib import Path; from lever_lm.rl.journal import Journal\n"
            "from lever_lm.errors import InputError\n"
            f"try:\n    Journal.open(Path({str(tmp_path)!r}))\nexcept InputError:\n    sys.exit(3)\n"
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    with Journal.open(tmp_path):  # released on close
        pass


def test_shards_have_their_own_files(tmp_path: Path):
    with Journal.open(tmp_path, shard_id=1, num_shards=3) as journal:
        journal.append(4, {})
    assert (tmp_path / "shard-1-of-3.jsonl").is_file()


def test_list_and_prune_keep_the_named_and_the_locked(tmp_path: Path):
    for name in ("aaa", "bbb", "ccc"):
        with Journal.open(tmp_path / name) as journal:
            journal.append(1, {})
    assert [s["fingerprint"] for s in list_journals(tmp_path)] == ["aaa", "bbb", "ccc"]
    with Journal.open(tmp_path / "ccc"):
        removed = prune_journals(tmp_path, keep={"aaa"})
    assert removed == ["bbb"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aaa", "ccc"]
