"""Atomic file output: a crash never leaves a half-written file for a user or DVC to trust.

Everything the project writes (embeddings, checkpoints, beam data, the RL data and its metadata)
goes through `atomic_output`: the content is written to a temporary file in the target's own
directory and renamed over the target only when complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


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
