"""Per-query candidate pools (docs/formats.md §7): the pools themselves, proposals over a pool alone, the record schema.

References are independent of the code under test: the pointer's distributions over a pool come
from its teacher-forced `forward` on the pool's embeddings alone, nearest neighbours from a float64
brute force, the pools of a cache from the JSON itself.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lever_lm.errors import InputError
from lever_lm.models.v2.pointer_selector import PointerSelectorV2
from lever_lm.models.v3 import proposals
from lever_lm.models.v3.pools import (
    CachedPools,
    PoolSettings,
    RandomPools,
    SimilarPools,
    load_pools,
    save_sampler_cache,
)
from lever_lm.models.v3.proposals import ProposalSettings, Proposer, query_generator, random_rows
from lever_lm.rl.journal import JournalSpec
from lever_lm.rl.records import RecordRules, entry_problems
from lever_lm.vqa.relevance import relevance

D, H, N = 12, 8, 30


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 4 pool rows and CDF blocks of 2, so a 7-row pool crosses tile and block borders."""
    monkeypatch.setattr(proposals, "SCAN_CHUNK", 4)
    monkeypatch.setattr(proposals, "DRAW_BLOCK", 2)


def _model(seed: int = 0) -> PointerSelectorV2:
    torch.manual_seed(seed)
    model = PointerSelectorV2(D, H, num_layers=1, use_gate=True).eval()
    with torch.no_grad():  # sharper distributions, so ranks are well separated
        model.query_proj.weight.mul_(3)
        model.cand_proj.weight.mul_(3)
    return model


def _emb(n: int = N, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def _settings(**kw) -> ProposalSettings:
    base = dict(shot_num=2, num_beams=4, temps=(0.8, 1.5), num_samples_per_temp=3, num_random=2, num_retrieval=2)
    return ProposalSettings(**{**base, **kw})


def _pool_step_log_probs(model, emb, query: int, rows: list[int], seqs: list[tuple[int, ...]]) -> torch.Tensor:
    """Per-step log-probs [n, S] of position sequences, the pointer run on the pool's embeddings alone."""
    labels = torch.tensor(seqs)
    with torch.no_grad():
        step = model(emb[[query] * len(seqs)], emb[rows], labels)  # no exclusion: the query is not in the pool
    return step.gather(2, labels.unsqueeze(2)).squeeze(2)


# -- the pools ------------------------------------------------------------------------------------


def test_cached_pools_equal_the_cache(tmp_path: Path):
    cache = {"5": [9, 1, 28, 3], "2": [0, 1, 4, 7], "11": [12, 10, 29, 6], "99": [1, 2]}  # 99: another run's query
    path = tmp_path / "sampler_cache.json"
    path.write_text(json.dumps(cache))
    pools = load_pools(
        PoolSettings("per_query", 4, sampler_cache=path), [2, 5, 11], 2, list(range(N)), False, 0, _emb(), _emb()
    )
    assert isinstance(pools, CachedPools) and pools.size == 4
    assert pools.pools_of([5, 2, 11]) == [tuple(cache["5"]), tuple(cache["2"]), tuple(cache["11"])]
    save_sampler_cache({2: cache["2"], 5: cache["5"]}, tmp_path / "again.json")  # the lineage's format
    assert json.loads((tmp_path / "again.json").read_text()) == {"2": cache["2"], "5": cache["5"]}


@pytest.mark.parametrize(
    "cache, settings, message",
    [
        ({"2": [0, 1, 4]}, {}, "no pool for 1 of the 2 queries (5)"),
        ({"2": [0, 1, 4], "5": [5, 1, 4]}, {}, "the pool of query 5 contains the query itself"),
        ({"2": [0, 1, 4], "5": [0, 1, 30]}, {}, "has ids outside 0..29"),
        ({"2": [0, 1, 4], "5": [0, -1, 4]}, {}, "has ids outside 0..29"),
        ({"2": [0, 1, 4], "5": [0, 1, 4, 6]}, {}, "pools of unequal size"),
        ({"2": [0, 1, 4], "5": [0, 1, 4]}, {"pool_size": 64}, "the pools hold 3 rows, --pool_size says 64"),
        ({"2": [0, 1, 1], "5": [0, 1, 4]}, {}, "the pool of query 2 repeats a row"),
        ({"2": [0, 1, "4"], "5": [0, 1, 4]}, {}, "must be a list of row ids"),
        ({"2": [0], "5": [1]}, {"pool_size": 1}, "--pool_size 1 is smaller than shot_num 2"),
        ({"2": [0, 1, 4], "5": [9, 6, 8]}, {"exclude_same_image": True}, "query 2 has 1 rows of other images"),
        ("[1, 2]", {}, "expected a JSON object"),
    ],
)
def test_bad_caches_are_input_errors(tmp_path: Path, cache, settings, message):
    path = tmp_path / "sampler_cache.json"
    path.write_text(cache if isinstance(cache, str) else json.dumps(cache))
    image_ids = [i // 4 for i in range(N)]  # rows 0-3 share an image
    pool = PoolSettings("per_query", settings.get("pool_size", 3), sampler_cache=path)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        load_pools(pool, [2, 5], 2, image_ids, settings.get("exclude_same_image", False), 0, _emb(), _emb())
    assert error.value.path == str(path) or "pool_size" in message


def test_rand_pools_are_seeded_per_query_on_their_own_stream():
    image_ids = [i // 3 for i in range(N)]  # rows 0-2 share an image, 3-5, ...
    pools = load_pools(PoolSettings("per_query", 8, "rand"), range(N), 2, image_ids, True, 42, _emb(), _emb())
    assert isinstance(pools, RandomPools)
    every = pools.pools_of(range(N))
    for q, pool in enumerate(every):
        assert len(pool) == 8 and len(set(pool)) == 8
        assert all(image_ids[r] != image_ids[q] for r in pool), "never the query, nor its image"
        banned = [r for r in range(N) if image_ids[r] == image_ids[q]]
        assert pool == random_rows(query_generator(42, q, "pools"), banned, N, 8)
        assert pool != random_rows(query_generator(42, q), banned, N, 8), "not the proposals' random numbers"
    assert pools.pools_of([17, 3]) == [every[17], every[3]], "a pool does not depend on its batch"
    other_seed = RandomPools(8, N, 43, None).pools_of(range(N))
    assert other_seed != every


def test_rand_pools_are_uniform():
    n, size, query = 12, 3, 5
    pools = RandomPools(size, n, 0, None)
    counts = torch.zeros(n)
    draws = 4000
    for seed in range(draws):
        pools.seed = seed
        for r in pools.pools_of([query])[0]:
            counts[r] += 1
    assert counts[query] == 0
    expected = draws * size / (n - 1)
    chi2 = float(((counts[torch.arange(n) != query] - expected) ** 2 / expected).sum())
    assert chi2 < 31.26  # chi-square upper 0.1% point, 10 degrees of freedom


@pytest.mark.parametrize("exclude_same_image", [False, True])
def test_sim_pools_are_the_true_nearest_neighbours(exclude_same_image):
    emb = _emb()
    emb[7] = emb[3]  # exact ties: the lower row comes first
    emb[19] = emb[3]
    query_emb = _emb(seed=5)
    image_ids = [i // 2 for i in range(N)]
    pools = load_pools(
        PoolSettings("per_query", 6, "sim"), range(N), 2, image_ids, exclude_same_image, 0, query_emb, emb * 3.0
    )  # the scale of a row does not matter: cosine
    assert isinstance(pools, SimilarPools)
    got = pools.pools_of(range(N))
    for q in range(N):
        cosine = (F.normalize(query_emb[q].double(), dim=0) @ F.normalize(emb.double(), dim=1).T).tolist()
        allowed = [r for r in range(N) if r != q and not (exclude_same_image and image_ids[r] == image_ids[q])]
        assert got[q] == tuple(sorted(allowed, key=lambda r: (-cosine[r], r))[:6])
    assert pools.pools_of([4]) == [got[4]]


def test_sampler_pools_need_enough_rows():
    with pytest.raises(InputError, match="query 0: only 29 rows are left .* fewer than --pool_size 30"):
        load_pools(PoolSettings("per_query", 30, "rand"), [0], 2, list(range(N)), False, 0, _emb(), _emb())
    with pytest.raises(InputError, match="only 27 rows are left for its pool after excluding the query and its image"):
        load_pools(PoolSettings("per_query", 28, "sim"), [4], 2, [i // 3 for i in range(N)], True, 0, _emb(), _emb())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pool="local"), "--pool must be one of global, per_query"),
        (dict(sampler="knn"), "--sampler must be one of cache, rand, sim"),
        (dict(pool_size=0), "--pool_size must be >= 1"),
        (dict(sampler="cache"), "--sampler cache needs --sampler_cache"),
    ],
)
def test_bad_pool_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        PoolSettings(**kwargs)


def test_pool_settings_defaults_and_description():
    assert PoolSettings().describe() == {"pool": "global"}
    assert PoolSettings(sampler_cache=Path("c.json")).describe() == {"pool": "global"}, "global: nothing else counts"
    assert PoolSettings("per_query").sampler == "rand"
    assert PoolSettings("per_query", sampler_cache=Path("c.json")).sampler == "cache"
    assert PoolSettings("per_query", 32, "sim", Path("c.json")).describe() == {
        "pool": "per_query",
        "pool_size": 32,
        "sampler": "sim",
    }
    assert load_pools(PoolSettings(), [0], 2, list(range(N)), False, 0, _emb(), _emb()) is None


# -- proposals over a pool alone ------------------------------------------------------------------

POOLS = {3: [17, 2, 25, 9, 0, 11, 28], 20: [5, 29, 1, 14, 8, 3, 22], 9: [4, 16, 27, 6, 13, 24, 19]}


def test_beams_equal_the_pointer_on_the_pool_alone():
    """A beam as wide as the prefixes is exact: the top sequences of the pointer over the pool's embeddings."""
    model, emb = _model(), _emb()
    proposer = Proposer(
        model, emb, emb, _settings(num_beams=6, temps=(), num_random=0, num_retrieval=0), per_query=True
    )
    for q, rows in POOLS.items():
        (got,) = proposer.propose([q], [rows])
        seqs = list(itertools.permutations(range(len(rows)), 2))
        steps = _pool_step_log_probs(model, emb, q, rows, seqs)
        order = steps.sum(1).argsort(descending=True)[:6]
        assert got.pool == tuple(rows)
        assert [c.pointer for c in got.candidates] == [seqs[i] for i in order]
        torch.testing.assert_close(torch.tensor([c.logprob_score for c in got.candidates]), steps.sum(1)[order])
        torch.testing.assert_close(torch.tensor([c.beam_score for c in got.candidates]), steps.exp().sum(1)[order])
        assert [got.global_pointer(c) for c in got.candidates] == [
            (rows[a], rows[b]) for a, b in (seqs[i] for i in order)
        ]


def test_samples_follow_the_tempered_pointer_on_the_pool_alone():
    model, emb = _model(seed=5), _emb(seed=6)
    q, rows, n, temp = 20, POOLS[20][:5], 2000, 1.5
    settings = ProposalSettings(num_beams=0, temps=(temp,), num_samples_per_temp=n, num_random=0)
    (by_method,) = Proposer(model, emb, emb, settings, per_query=True).propose_by_method([q], [rows])
    seqs = list(itertools.permutations(range(len(rows)), 2))
    labels = torch.tensor(seqs)
    with torch.no_grad():
        steps = model(emb[[q] * len(seqs)], emb[rows], labels)  # [n, 2, P] step log-probs over the pool alone
    # log softmax(logits / T) == log softmax(log-probs / T): the log-probs are the logits up to a constant
    tempered = sum(
        torch.log_softmax(steps[:, t] / temp, dim=-1).gather(1, labels[:, t : t + 1]).squeeze(1) for t in range(2)
    )
    by_seq = dict(zip(seqs, tempered.tolist()))
    for c in by_method["sample"]:
        assert c.logprob_score == pytest.approx(by_seq[c.pointer], abs=1e-4)
    counts = torch.tensor([sum(c.pointer == s for c in by_method["sample"]) for s in seqs], dtype=torch.float64)
    expected = tempered.exp().double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = len(seqs) - 1
    assert chi2 < df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3


def test_random_and_retrieval_over_the_pool_alone():
    model, emb = _model(), _emb()
    q, rows = 9, POOLS[9]
    settings = ProposalSettings(num_beams=0, temps=(), num_random=3, num_retrieval=3, seed=7)
    (got,) = Proposer(model, emb, emb, settings, per_query=True).propose_by_method([q], [rows])
    generator = query_generator(7, q)
    assert [c.pointer for c in got["random"]] == [random_rows(generator, [], len(rows), 2) for _ in range(3)]
    cosine = (F.normalize(emb[q], dim=0) @ F.normalize(emb[rows], dim=1).T).tolist()
    pairs = sorted(itertools.combinations(range(len(rows)), 2), key=lambda p: -(cosine[p[0]] + cosine[p[1]]))[:3]
    assert [c.pointer for c in got["retrieval"]] == [tuple(sorted(p, key=lambda i: -cosine[i])) for p in pairs]


def test_a_batch_of_queries_with_their_own_pools_equals_each_alone():
    model, emb = _model(), _emb()
    proposer = Proposer(model, emb, emb, _settings(), per_query=True)
    together = proposer.propose(list(POOLS), list(POOLS.values()))
    for got, (q, rows) in zip(together, POOLS.items()):
        assert got.query_idx == q and got == proposer.propose([q], [rows])[0]
        assert all(0 <= i < len(rows) for c in got.candidates for i in c.pointer)


def test_exclude_same_image_masks_pool_rows_of_the_querys_image():
    model, emb = _model(), _emb()
    image_ids = list(range(N))
    image_ids[25] = image_ids[9] = image_ids[3]  # rows 25 and 9 (positions 2 and 3 of query 3's pool) share its image
    settings = _settings(exclude_same_image=True, num_beams=30)
    (got,) = Proposer(model, emb, emb, settings, image_ids=image_ids, per_query=True).propose([3], [POOLS[3]])
    used = {i for c in got.candidates for i in c.pointer}
    assert used and not used & {2, 3}
    assert len([c for c in got.candidates if c.gen_method == "beam"]) == 20  # 5 x 4 sequences of the 5 rows left


def test_bad_pools_and_modes_are_refused():
    model, emb = _model(), _emb()
    per_query = Proposer(model, emb, emb, _settings(), per_query=True)
    with pytest.raises(InputError, match="query 3: its pool must be distinct rows"):
        per_query.propose([3], [[1, 3, 5]])
    with pytest.raises(InputError, match="its pool must be distinct rows in 0..29"):
        per_query.propose([3], [[1, 30, 5]])
    with pytest.raises(InputError, match="only 1 pool rows are left"):
        per_query.propose([3], [[1]])
    with pytest.raises(ValueError, match="per_query"):
        per_query.propose([3])
    assert per_query.pool is None, "the global pool is never encoded"
    with pytest.raises(ValueError, match="per_query"):
        Proposer(model, emb, emb, _settings()).propose([3], [[1, 2, 4]])


# -- the record schema and the journal ------------------------------------------------------------


def _record(query: int = 3, pool=(17, 2, 25, 9)) -> dict:
    candidates = [
        {"pointer": [1, 3], "pointer_global": [pool[1], pool[3]], "gen_method": "beam", "beam_rank": 0,
         "beam_score": 1.2, "logprob_score": -0.5, "temperature": None, "vqa_raw_generation": "red",
         "vqa_pred_answer": "red", "vqa_correct": 1, "vqa_acc_score": 1.0, "vqa_eval_mode": "vqaEval",
         "eval_failed": False},
        {"pointer": [0, 2], "pointer_global": [pool[0], pool[2]], "gen_method": "random", "beam_rank": None,
         "beam_score": None, "logprob_score": None, "temperature": None, "vqa_raw_generation": "blue",
         "vqa_pred_answer": "blue", "vqa_correct": 0, "vqa_acc_score": 0.0, "vqa_eval_mode": "vqaEval",
         "eval_failed": False},
    ]  # fmt: skip
    for candidate in candidates:
        candidate |= {"vqa_gt_prob": None, **relevance(candidate["vqa_pred_answer"], ["red"] * 10)}
    query = {
        "query_id": query,
        "question_id": 1,
        "image_id": 1,
        "question": "q?",
        "gt_answers_raw": ["red"] * 10,
    }
    return {"query": query, "candidate_pool_ids": list(pool), "pointer_candidates": candidates}


RULES = RecordRules(shot_num=2, num_items=N, pool_size=4)


def _broken(edit) -> dict:
    record = copy.deepcopy(_record())
    edit(record)
    return record


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda r: r.update(candidate_pool_ids=[17, 2, 25]), "has 3 rows, expected pool_size = 4"),
        (lambda r: r.update(candidate_pool_ids=[17, 2, 25, 3]), "candidate_pool_ids contains the query"),
        (lambda r: r.update(candidate_pool_ids=[17, 2, 25, 30]), "candidate_pool_ids has ids outside 0..29"),
        (lambda r: r.update(candidate_pool_ids=[17, 2, 25, 2]), "candidate_pool_ids repeats a row"),
        (lambda r: r.pop("candidate_pool_ids"), "candidate_pool_ids missing"),
        (
            lambda r: r["query"].update(candidate_pool_ids=r.pop("candidate_pool_ids")),
            "the pool belongs beside 'query'",
        ),
        (lambda r: r["pointer_candidates"][0].update(pointer=[1, 4]), "pointer [1, 4] has ids outside 0..3"),
        (lambda r: r["pointer_candidates"][0].update(pointer_global=[2, 17]), "pointer_global [2, 17] is not"),
        (lambda r: r["pointer_candidates"][1].pop("pointer_global"), "pointer_global missing"),
    ],
)
def test_the_schema_checks_pools_and_pointers(edit, problem):
    assert list(entry_problems(3, _record(), RULES)) == []
    problems = list(entry_problems(3, _broken(edit), RULES))
    assert any(problem in p for p in problems), problems


def test_pool_fields_in_a_global_run_are_refused():
    problems = list(entry_problems(3, _record(), RecordRules(shot_num=2, num_items=N)))
    assert any("candidate_pool_ids in a record of a global-pool run" in p for p in problems)
    assert any("pointer_global in a record of a global-pool run" in p for p in problems)


def test_journal_header_states_the_pool_size():
    spec = JournalSpec({"a": 1}, (3, 5), RULES)
    assert spec.header()["rules"] == {"shot_num": 2, "num_items": N, "pool_size": 4}
    assert JournalSpec.from_header(spec.header()) == spec
    global_spec = JournalSpec({"a": 1}, (3, 5), RecordRules(2, N))
    assert global_spec.header()["rules"] == {"shot_num": 2, "num_items": N}, "global headers are unchanged"
    assert JournalSpec.from_header(global_spec.header()) == global_spec
