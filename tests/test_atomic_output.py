"""Atomic output: a write killed mid-way leaves a temporary file that the next write of the same target
removes, and nothing else (not another target's temporaries, not a live writer's)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from lever_lm.io import atomic_output, remove_stale_temporaries

KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from lever_lm.io import atomic_output
    with atomic_output(sys.argv[1]) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_write_killed_with_sigkill_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)])
    assert killed.returncode == -9
    (left,) = [n for n in names(tmp_path) if n != "x.json"]
    assert left.startswith(".x.json.") and left.endswith(".tmp") and target.read_text() == "old"
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert names(tmp_path) == ["x.json"] and target.read_text() == "new"


def test_only_the_targets_own_temporaries_are_removed(tmp_path):
    target = tmp_path / "x.json"
    own = [".x.json.abcd_123.tmp", ".x.json.zzzzzzzz.tmp"]
    others = [
        ".x.json.meta.json.abcd_123.tmp",  # the sidecar's: removed by the sidecar's own next write
        ".y.json.abcd_123.tmp",
        "x.json.abcd_123.tmp",
        ".x.json.abcd_123.tmp.keep",
        ".x.json.ABCD_123.tmp",
        ".x.json.abc.tmp",
        ".x.json.notes-12.tmp",
    ]
    for name in own + others:
        (tmp_path / name).write_text("left")
    (tmp_path / ".x.json.dir12345.tmp").mkdir()
    assert sorted(p.name for p in remove_stale_temporaries(target)) == own
    assert names(tmp_path) == sorted([*others, ".x.json.dir12345.tmp"])
    meta = tmp_path / "x.json.meta.json"
    with atomic_output(meta) as tmp:
        tmp.write_text("{}")
    assert ".x.json.meta.json.abcd_123.tmp" not in names(tmp_path) and meta.read_text() == "{}"


def test_a_temporary_that_a_live_writer_holds_is_kept(tmp_path):
    target = tmp_path / "x.json"
    with atomic_output(target) as first:
        first.write_text("first")
        assert remove_stale_temporaries(target) == []
        with atomic_output(target) as second:  # a second writer of the same target, e.g. another run
            second.write_text("second")
        assert first.read_text() == "first"
    assert target.read_text() == "first" and names(tmp_path) == ["x.json"]


def test_a_missing_directory_is_nothing_to_clean(tmp_path):
    assert remove_stale_temporaries(tmp_path / "absent" / "x.json") == []
