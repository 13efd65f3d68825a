"""What the chaos driver watches: journal lines and processes (Linux: it reads `/proc`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def complete_lines(path: Path | None) -> int:
    """Newline-terminated lines in a file (0 when there is none): a journal's header and records."""
    if path is None:
        return 0
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# -- processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """A process as /proc shows it; `start` (clock ticks since boot) tells it from a later one with its pid."""

    pid: int
    start: int
    name: str


def _stat(pid: int) -> tuple[int, Process, str] | None:
    """(parent pid, the process, its state letter), or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), Process(pid, int(fields[19]), name), fields[0]


def alive(process: Process) -> bool:
    """The same process (pid and start time) still runs; a zombie, dead but not yet reaped, does not count."""
    stat = _stat(process.pid)
    return stat is not None and stat[1].start == process.start and stat[2] not in ("Z", "X")


def process(pid: int) -> Process | None:
    stat = _stat(pid)
    return stat[1] if stat else None


def descendants(root: int) -> set[Process]:
    """`root` and every process below it (children, their children...)."""
    parents: dict[int, list[Process]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents.setdefault(stat[0], []).append(stat[1])
    found, frontier = set(), [root]
    own = process(root)
    if own:
        found.add(own)
    while frontier:
        for child in parents.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child.pid)
    return found


def stopped(pid: int, timeout: float = 1.0) -> None:
    """Wait until a process sent SIGSTOP has stopped (state T) or is gone: SIGSTOP is asynchronous."""
    deadline = time.time() + timeout
    while (stat := _stat(pid)) is not None and stat[2] not in ("T", "t", "Z", "X") and time.time() < deadline:
        time.sleep(0.0001)
