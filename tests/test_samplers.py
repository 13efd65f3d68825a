"""The lineage's samplers (stage `sample_pools`): the queries, each one's pool, the sampler cache they write.

References are independent of the code under test: nearest rows from a float64 brute force, the
lineage's "top pool_size + 1, drop the first hit" written from its samplers' code.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lever_lm.data.vqa import VQADataset
from lever_lm.demo.dataset import Split
from lever_lm.errors import InputError
from lever_lm.models.v3 import samplers
from lever_lm.models.v3.pools import PoolSettings, RandomPools, load_pools, load_sampler_cache, read_sampler_cache
from lever_lm.models.v3.samplers import draw_queries, mix_counts, sample_pools

N = 40


def _emb(n: int = N, d: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _nearest_reference(emb: torch.Tensor, query: int, size: int, banned: set[int]) -> list[int]:
    """Rows by decreasing float64 cosine to the query, ties to the lower row, `banned` left out."""
    unit = F.normalize(emb.double(), dim=1)
    cosines = (unit @ unit[query]).tolist()
    rows = sorted((r for r in range(len(emb)) if r not in banned), key=lambda r: (-round(cosines[r], 9), r))
    return rows[:size]


def test_queries_are_a_seeded_ascending_draw():
    queries = draw_queries(100, 10, seed=3)
    assert queries == sorted(set(queries)) and len(queries) == 10 and all(0 <= q < 100 for q in queries)
    assert draw_queries(100, 10, seed=3) == queries and draw_queries(100, 10, seed=4) != queries
    with pytest.raises(InputError, match="--num_queries must be in 1..100"):
        draw_queries(100, 101, seed=0)


def test_rand_pools_are_the_generators_random_pools():
    queries = [0, 7, 39]
    image_ids = list(range(N))
    pools = sample_pools("rand", queries, image_ids, pool_size=8, seed=5)
    assert list(pools.values()) == RandomPools(8, N, 5, None).pools_of(queries)
    for q, pool in pools.items():
        assert len(set(pool)) == 8 and q not in pool


@pytest.mark.parametrize("sampler, kind", [("text_sim", "text"), ("img_sim", "image")])
def test_similarity_pools_are_the_nearest_rows_by_their_embedding(sampler, kind):
    text, image = _emb(seed=1), _emb(seed=2)
    emb = text if kind == "text" else image
    pools = sample_pools(sampler, [3, 11], list(range(N)), pool_size=6, text_emb=text, image_emb=image)
    for q, pool in pools.items():
        assert list(pool) == _nearest_reference(emb, q, 6, {q})


def test_the_query_is_never_in_its_pool_even_among_duplicates():
    """Rows 0..9 share one embedding (a picture's questions, or one question asked ten times). The
    lineage keeps the top pool_size + 1 and drops the first hit: for most queries the first hit is
    another duplicate, and the query stays in its own pool."""
    emb = _emb()
    emb[:10] = emb[0]
    queries = list(range(10))
    pools = sample_pools("img_sim", queries, list(range(N)), pool_size=5, image_emb=emb)
    for q in queries:
        assert q not in pools[q] and len(set(pools[q])) == 5
        assert set(pools[q]) <= set(range(10)) - {q}  # the other duplicates are the nearest
    unit = F.normalize(emb, dim=1)
    lineage = {q: (unit @ unit[q]).topk(6).indices.tolist()[1:] for q in queries}  # drop the first hit
    assert any(q in lineage[q] for q in queries), "the lineage's way leaves some query in its own pool"


def test_mix_pools_take_the_lineages_shares_without_repeating_a_row():
    assert mix_counts(64) == {"rand": 32, "text_sim": 16, "img_sim": 16}
    assert mix_counts(10) == {"rand": 5, "text_sim": 2, "img_sim": 3}
    text, image = _emb(seed=1), _emb(seed=2)
    text[5] = image[5] = 0  # nothing special about a zero row
    pools = sample_pools("mix", [4, 20], list(range(N)), pool_size=10, seed=1, text_emb=text, image_emb=image)
    for q, pool in pools.items():
        assert len(pool) == 10 and len(set(pool)) == 10 and q not in pool
        rand, by_image, by_text = pool[:5], pool[5:8], pool[8:]
        assert list(by_image) == _nearest_reference(image, q, 3, {q})
        assert list(by_text) == _nearest_reference(text, q, 2, {q, *by_image})
        assert not set(rand) & set(by_image + by_text)


def test_exclude_same_image_keeps_the_querys_picture_out():
    image_ids = [r // 4 for r in range(N)]  # four questions per picture
    emb = _emb()
    pools = sample_pools("img_sim", [0, 13], image_ids, pool_size=6, image_emb=emb, exclude_same_image=True)
    for q, pool in pools.items():
        assert all(image_ids[r] != image_ids[q] for r in pool)
        assert list(pool) == _nearest_reference(emb, q, 6, {r for r in range(N) if image_ids[r] == image_ids[q]})
    with pytest.raises(InputError, match="only 36 rows are left"):
        sample_pools("rand", [0], image_ids, pool_size=37, exclude_same_image=True)


def test_similarity_samplers_need_embeddings():
    with pytest.raises(InputError, match="the text_sim sampler needs CLIP embeddings"):
        sample_pools("text_sim", [0], list(range(N)), pool_size=4)


# -- the command line on the demo ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def split(demo_dir) -> Split:
    return Split("train", demo_dir / "vqa")


def _flags(split: Split) -> list[str]:
    return [
        "--train_ques_path", str(split.questions_path),
        "--train_ann_path", str(split.annotations_path),
        "--train_image_root", str(split.image_root),
    ]  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
def test_cli_writes_the_lineages_sampler_cache_that_the_generator_reads(split, demo_dir, tmp_path):
    dataset = VQADataset.load(split.questions_path, split.annotations_path, split.image_root)
    out = tmp_path / "pools.json"
    clip = str(demo_dir / "models" / "clip-tiny")
    argv = [*_flags(split), "--out", str(out), "--num_queries", "5", "--pool_size", "8", "--seed", "2"]
    samplers.main([*argv, "--sampler", "mix", "--clip_model", clip, "--no_progress"])
    cache = json.loads(out.read_text())
    queries = draw_queries(len(dataset), 5, seed=2)
    assert list(cache) == [str(q) for q in queries]
    assert read_sampler_cache(out, len(dataset)) == {q: tuple(cache[str(q)]) for q in queries}
    settings = PoolSettings("per_query", 8, "cache", out)
    zeros = torch.zeros(len(dataset), 1)
    pools = load_pools(settings, queries, 2, dataset.image_ids, False, 0, zeros, zeros)
    assert pools.pools_of(queries) == [tuple(cache[str(q)]) for q in queries]
    samplers.main([*argv, "--sampler", "rand"])  # no model needed
    assert load_sampler_cache(out, queries, len(dataset), 8) == dict(
        zip(queries, RandomPools(8, len(dataset), 2, None).pools_of(queries))
    )


def test_cli_refuses_a_similarity_sampler_without_clip(split, tmp_path, capsys):
    out = tmp_path / "pools.json"
    with pytest.raises(SystemExit) as exit_:
        samplers.main([*_flags(split), "--out", str(out), "--num_queries", "5", "--sampler", "text_sim"])
    assert exit_.value.code == 2
    assert "--sampler text_sim needs --clip_model" in capsys.readouterr().err
    assert not out.exists()
