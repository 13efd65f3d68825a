"""User-facing errors: a bad input file or setting, reported as one line, never as a traceback.

Library code raises `InputError(path, problem)` for anything the user can fix (a missing file,
malformed JSON, an id out of range, a checkpoint with the wrong keys). Command-line entry points
wrap their work in `exit_on_input_error()`, which prints `error: <path>: <problem>` and exits
with status 2, so a long GPU job fails fast and readably before any expensive work.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

EXIT_INPUT_ERROR = 2


class InputError(Exception):
    """A problem with a user-supplied file or setting; `path` names it (or None for a setting)."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


@contextlib.contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn an `InputError` into `error: ...` on stderr and exit status 2."""
    try:
        yield
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT_ERROR) from None


def short_error(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line InputError texts about a library failure."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
