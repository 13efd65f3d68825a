"""Embedding files (docs/formats.md §3.3): `torch.save` of a float32 tensor [N, d], row i = training item i.

The pointer model trusts these rows blindly (row i IS item i), so a file made for another split,
another CLIP, or a crashed export must be refused when it is loaded: wrong N, wrong d between
the query and candidate files, NaN or Inf. Files are written atomically (temporary file in the
same directory, then `os.replace`), so a crash never leaves a half-written .pt for DVC to cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lever_lm.errors import InputError, short_error
from lever_lm.io import atomic_torch_save


def load_embeddings(path: str | Path, num_items: int | None = None) -> Tensor:
    """A checked float32 [N, d] tensor; `num_items` (the data set size) must equal N when given."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "embeddings file not found")
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises KeyError, EOFError, UnpicklingError, ... on bad files
        raise InputError(path, f"not a torch tensor file ({short_error(error)})") from None
    if not isinstance(tensor, Tensor):
        raise InputError(path, f"expected a tensor [N, d], found {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise InputError(path, f"expected a 2-D tensor [N, d], found shape {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise InputError(path, f"expected floating-point embeddings, found {tensor.dtype}")
    if num_items is not None and tensor.shape[0] != num_items:
        raise InputError(path, f"has {tensor.shape[0]} rows but the data set has {num_items} items")
    tensor = tensor.to(torch.float32).contiguous()
    bad_rows = _rows_not_finite(tensor)
    if bad_rows:
        raise InputError(path, f"{len(bad_rows)} rows hold NaN or Inf (first: row {bad_rows[0]})")
    return tensor


def _rows_not_finite(tensor: Tensor, chunk_rows: int = 1 << 16) -> list[int]:
    """Rows holding NaN or Inf. A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum (one
    pass, no copy) clears the whole tensor; only otherwise are rows checked, a chunk at a time."""
    if torch.isfinite(tensor.sum()):
        return []
    bad = []
    for start in range(0, tensor.shape[0], chunk_rows):
        chunk = tensor[start : start + chunk_rows]
        bad += (start + (~torch.isfinite(chunk)).any(dim=1).nonzero().flatten()).tolist()
    return bad  # empty when the sum only overflowed


def check_embedding_pair(query: Tensor, cand: Tensor, query_path: str | Path, cand_path: str | Path) -> None:
    """Query and candidate embeddings must describe the same items in the same space."""
    if query.shape != cand.shape:
        raise InputError(
            query_path,
            f"shape {list(query.shape)} disagrees with the candidate embeddings {cand_path} "
            f"of shape {list(cand.shape)} (same N and d expected)",
        )


def save_embeddings(tensor: Tensor, path: str | Path) -> None:
    """Write a float32 [N, d] tensor atomically."""
    if tensor.ndim != 2:
        raise ValueError(f"embeddings must be [N, d], got shape {list(tensor.shape)}")
    atomic_torch_save(tensor.detach().to("cpu", torch.float32).contiguous(), path)
