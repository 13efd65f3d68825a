"""Embedding files: round trip, atomic and reproducible writes, a clear error for each bad file."""

from __future__ import annotations

import pytest
import torch

from lever_lm.data.embeddings import check_embedding_pair, load_embeddings, save_embeddings
from lever_lm.errors import InputError
from lever_lm.io import atomic_output


def test_round_trip_is_float32_and_byte_reproducible(tmp_path):
    tensor = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    save_embeddings(tensor, tmp_path / "a" / "q.pt")
    save_embeddings(tensor, tmp_path / "b" / "other_name.pt")
    loaded = load_embeddings(tmp_path / "a" / "q.pt", num_items=5)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, tensor)
    assert (tmp_path / "a" / "q.pt").read_bytes() == (tmp_path / "b" / "other_name.pt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["q.pt"]


def test_half_precision_is_converted(tmp_path):
    torch.save(torch.ones(2, 4, dtype=torch.float16), tmp_path / "h.pt")
    assert load_embeddings(tmp_path / "h.pt").dtype == torch.float32


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


@pytest.mark.parametrize(
    "content, num_items, message",
    [
        (None, None, "embeddings file not found"),
        (b"hello world", None, "not a torch tensor file"),
        (b"", None, "not a torch tensor file"),
        ({"emb": torch.ones(2, 2)}, None, "expected a tensor"),
        (torch.ones(4), None, r"expected a 2-D tensor \[N, d\], found shape \[4\]"),
        (torch.ones(3, 2, dtype=torch.long), None, "expected floating-point"),
        (torch.ones(3, 2), 4, "has 3 rows but the data set has 4 items"),
        (
            torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [float("inf"), 1.0]]),
            3,
            "2 rows hold NaN or Inf .first: row 1",
        ),
    ],
)
def test_bad_embeddings_name_the_file_and_the_problem(tmp_path, content, num_items, message):
    path = tmp_path / "emb.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(InputError, match=message) as error:
        load_embeddings(path, num_items=num_items)
    assert error.value.path == str(path)


def test_query_and_candidate_files_must_agree():
    check_embedding_pair(torch.ones(3, 2), torch.zeros(3, 2), "q.pt", "c.pt")
    for cand in (torch.ones(4, 2), torch.ones(3, 5)):
        with pytest.raises(InputError, match="disagrees with the candidate embeddings c.pt") as error:
            check_embedding_pair(torch.ones(3, 2), cand, "q.pt", "c.pt")
        assert error.value.path == "q.pt"


def test_finite_rows_are_found_chunk_by_chunk_and_an_overflowing_sum_is_not_an_error():
    from lever_lm.data.embeddings import _rows_not_finite

    tensor = torch.zeros(10, 3)
    assert _rows_not_finite(tensor, chunk_rows=4) == []
    tensor[5, 1], tensor[9, 0] = float("nan"), float("-inf")
    assert _rows_not_finite(tensor, chunk_rows=4) == [5, 9]
    huge = torch.full((4, 2), 3e38)  # every value finite, the sum is not
    assert not torch.isfinite(huge.sum()) and _rows_not_finite(huge, chunk_rows=3) == []
