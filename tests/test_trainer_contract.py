"""Our files, read the way the lineage's GRPO trainer reads them (docs/formats.md §8).

`TrainerView` follows the reading rules of Lever-Plus's `scripts/train_v3.sh`,
`grpo_post_train.main` and `RLBeamDatasetWithEmbedding`, written down from their code (never
copied): the script's probe, the numeric keys, the shot count, the 80/20 split, the candidates it
skips, where it takes each query's pool from and when it counts pointers as positions in it, the
embedding rows it trains on, and the reward of each mode. Every layout the generator writes is run
through it, each made by the real generator with the tiny VLM: the global pool, per-query pools
from a sampler cache, retrieval candidates, three shots, and failed evaluations (an ICD image that
cannot be read).
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lever_lm.data.beam_data import load_beam_data
from lever_lm.io import read_json
from lever_lm.models.v3 import generate_rl_data
from lever_lm.rl.rewards import REWARD_MODES, RewardWeights

LIMIT = 5
POOL_SIZE = 16
MAX_POOL = 64  # the trainer keeps at most this many rows of a pool it gathers itself
REWARD_CLIP = (-5.0, 5.0)
HW, SW, RW = 1.0, 1.0, 0.1  # the trainer's default weights


# -- the trainer's rules --------------------------------------------------------------------------


def trainer_reward(mode: str, c: dict) -> float:
    """The trainer's reward of a candidate (a missing or null field counts as 0), clipped."""
    hard, soft = float(c.get("vqa_correct") or 0), float(c.get("vqa_acc_score") or 0)
    gtprob, rel = float(c.get("vqa_gt_prob") or 0), float(c.get("vqa_rel_score") or 0)
    reward = {
        "hard_plus_soft": HW * hard + SW * soft,
        "hard_plus_soft_v2": SW * soft + 2 * HW * hard,
        "separated": 2 * HW + SW * soft if hard == 1 else SW * soft,
        "hard_only": HW * hard,
        "soft_only": SW * soft,
        "hard01_plus_gtprob": HW * hard + SW * gtprob,
        "hard01_plus_gtprob_separated": 2 * HW + SW * gtprob if hard == 1 else SW * gtprob,
        "hard_plus_gtprob_plus_rel": HW * hard + SW * gtprob + RW * (1 - hard) * rel,
    }[mode]
    return min(max(reward, REWARD_CLIP[0]), REWARD_CLIP[1])


TRAINER_MODES = ("hard_plus_soft", "hard_plus_soft_v2", "separated", "hard_only", "soft_only",
                 "hard01_plus_gtprob", "hard01_plus_gtprob_separated", "hard_plus_gtprob_plus_rel")  # fmt: skip
# the fields each mode reads
MODE_FIELDS = {
    "hard": ("vqa_correct",),
    "soft": ("vqa_acc_score",),
    "gtprob": ("vqa_gt_prob",),
    "rel": ("vqa_rel_score",),
}


@dataclass
class Sample:
    """One query as the trainer's dataset holds it."""

    query_id: int
    labels: list[list[int]]  # positions in `pool`, after the dataset's mapping
    raw_labels: list[list[int]]  # as read from the file
    pool: list[int]  # global rows: the candidate embeddings are emb[pool]
    use_local_indices: bool
    survivors: list[dict]
    skipped: int


def is_numeric_key(key: str) -> bool:
    return key != "_meta" and key.replace("-", "").replace("_", "").isdigit()


def script_probe(data: dict) -> bool:
    """train_v3.sh regenerates the data unless the file's first value has candidates and its first has vqa_eval_mode."""
    first = next(iter(data.values()))
    return (
        isinstance(first, dict)
        and bool(first.get("pointer_candidates"))
        and "vqa_eval_mode" in first["pointer_candidates"][0]
    )


class TrainerView:
    """An RL data file as the trainer reads it (see the module doc)."""

    def __init__(self, data: dict, embeddings: torch.Tensor):
        self.data, self.embeddings = data, embeddings
        keys = [k for k in data if is_numeric_key(k)]
        first = data[keys[0]].get("pointer_candidates", [])
        if not first:
            raise ValueError("the first query has no candidates: the trainer stops (unknown format)")
        self.format = "rl"
        self.shot_num = len(first[0].get("pointer") or first[0].get("pointer_pos", []))
        ordered = sorted(keys, key=int)
        cut = int(len(ordered) * 0.8)
        self.train_keys, self.val_keys = ordered[:cut], ordered[cut:]
        self.samples = [s for k in ordered if (s := self._sample(k)) is not None]

    def _sample(self, key: str) -> Sample | None:
        entry = self.data[key]
        candidates = entry.get("pointer_candidates", [])
        if not candidates:
            return None
        labels, survivors, skipped = [], [], 0
        for c in candidates:
            if c.get("eval_failed", False) or c.get("vqa_eval_mode") in ("fallback", "error"):
                skipped += 1
                continue
            pointer = c["pointer"] if "pointer_global" in c else c.get("pointer_pos", c.get("pointer"))
            assert len(pointer) == self.shot_num
            labels.append(list(pointer))
            survivors.append(c)
        if not labels:
            return None
        if "candidate_pool_ids" in entry and "pointer_global" in candidates[0]:
            pool, local = list(entry["candidate_pool_ids"]), True
        else:
            pool, local = sorted({i for pointer in labels for i in pointer})[:MAX_POOL], False
        if local:
            mapped = labels
        else:
            position = {row: n for n, row in enumerate(pool)}
            mapped = [[position[i] for i in pointer] for pointer in labels]  # KeyError, as in the trainer
        return Sample(int(key), mapped, labels, pool, local, survivors, skipped)

    def candidate_embeddings(self, sample: Sample) -> torch.Tensor:
        return self.embeddings[sample.pool]


# -- the layouts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    path: Path
    shot_num: int
    cache: dict | None = None  # the sampler cache of a per-query run


@pytest.fixture(scope="module")
def cache(rl_inputs, tmp_path_factory) -> Path:
    """A sampler cache in the lineage's format for the beam queries."""
    queries = load_beam_data(rl_inputs.beam_data, 274).query_ids
    draw = random.Random(5)
    pools = {str(q): draw.sample([r for r in range(274) if r != q], POOL_SIZE) for q in queries}
    path = tmp_path_factory.mktemp("contract_cache") / "sampler_cache.json"
    path.write_text(json.dumps(pools))
    return path


@pytest.fixture(scope="module")
def layouts(rl_inputs, cache, tmp_path_factory) -> dict[str, Layout]:
    """Each layout the generator writes, made by the generator with the tiny VLM."""
    out = tmp_path_factory.mktemp("contract")

    def generate(name: str, *extra: str) -> Path:
        path = out / name / "rl.json"
        generate_rl_data.main(rl_inputs.generator_argv(path, "--limit", str(LIMIT), *extra))
        return path

    made = {
        "global": Layout("global", generate("global"), 2),
        "per_query": Layout(
            "per_query",
            generate("per_query", "--pool", "per_query", "--pool_size", str(POOL_SIZE), "--sampler_cache", str(cache)),
            2,
            json.loads(cache.read_text()),
        ),
        "retrieval": Layout("retrieval", generate("retrieval", "--num_retrieval", "2"), 2),
        "shot_3": Layout("shot_3", generate("shot_3", "--shot_num", "3"), 3),
    }
    # failed evaluations: the ICD that the global run uses most, made unreadable in a copy of the images
    data = read_json(made["global"].path)
    usage = Counter(i for e in data.values() for c in e["pointer_candidates"] for i in c["pointer"])
    victim = next(i for i, _ in usage.most_common() if str(i) not in data)
    images = shutil.copytree(rl_inputs.vqa / "mscoco2014" / "train2014", out / "train2014")
    broken = images / rl_inputs.dataset_paths().load().image_path(victim).name
    broken.write_bytes(broken.read_bytes()[:64])  # truncated: the real backend cannot read it
    made["failed"] = Layout("failed", generate("failed", "--train_image_root", str(images)), 2)
    return made


@pytest.fixture(scope="module")
def embeddings(rl_inputs) -> torch.Tensor:
    """The trainer's `--img_emb`: one matrix for queries and candidates (ours hold the same tensor)."""
    return torch.load(rl_inputs.cand_emb)


LAYOUTS = ("global", "per_query", "retrieval", "shot_3", "failed")


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_trainer_takes_the_file_as_rl_data(layouts, embeddings, name):
    layout = layouts[name]
    data = read_json(layout.path)
    assert script_probe(data), "train_v3.sh would throw the file away and regenerate"
    assert all(k.isdigit() for k in data) and "_meta" not in data
    view = TrainerView(data, embeddings)
    assert view.format == "rl" and view.shot_num == layout.shot_num
    assert len(view.samples) == len(data) == LIMIT, "every query reaches the trainer"
    assert view.train_keys + view.val_keys == list(data) and len(view.val_keys) == 1


@pytest.mark.parametrize("name", LAYOUTS)
def test_pools_and_labels_point_at_the_rows_the_prompts_showed(layouts, embeddings, name):
    layout = layouts[name]
    data = read_json(layout.path)
    for sample in TrainerView(data, embeddings).samples:
        shown = [c.get("pointer_global", c["pointer"]) for c in sample.survivors]  # the prompt's rows
        assert [[sample.pool[i] for i in label] for label in sample.labels] == shown
        cand_emb = TrainerView(data, embeddings).candidate_embeddings(sample)
        for label, rows in zip(sample.labels, shown):
            assert torch.equal(cand_emb[label], embeddings[rows])
        if name == "per_query":
            assert sample.use_local_indices, "per-query pools are read with local indices"
            assert sample.pool == layout.cache[str(sample.query_id)], "the pool is exactly the cached pool"
            assert len(sample.pool) == POOL_SIZE
        else:
            assert not sample.use_local_indices
            assert len({i for rows in shown for i in rows}) <= MAX_POOL, "the trainer's pool holds every used row"


def test_retrieval_and_three_shot_layouts(layouts, embeddings):
    retrieval = TrainerView(read_json(layouts["retrieval"].path), embeddings)
    methods = Counter(c["gen_method"] for s in retrieval.samples for c in s.survivors)
    assert methods["retrieval"] > 0
    assert all(
        c["logprob_score"] is None for s in retrieval.samples for c in s.survivors if c["gen_method"] == "retrieval"
    )
    three = TrainerView(read_json(layouts["shot_3"].path), embeddings)
    assert all(len(label) == 3 for s in three.samples for label in s.labels)


def test_failed_evaluations_are_skipped_and_the_rest_trained_on(layouts, embeddings):
    data = read_json(layouts["failed"].path)
    failed = sum(c["eval_failed"] for e in data.values() for c in e["pointer_candidates"])
    view = TrainerView(data, embeddings)
    assert failed > 0 and sum(s.skipped for s in view.samples) == failed
    assert all(not c["eval_failed"] and c["vqa_eval_mode"] == "vqaEval" for s in view.samples for c in s.survivors)
    assert (
        sum(len(s.survivors) for s in view.samples) == sum(len(e["pointer_candidates"]) for e in data.values()) - failed
    )
    for name in ("global", "per_query", "retrieval", "shot_3"):
        assert sum(s.skipped for s in TrainerView(read_json(layouts[name].path), embeddings).samples) == 0


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_reward_mode_reads_real_values(layouts, embeddings, name):
    """Each mode's fields are present and typed on every candidate the trainer keeps (with gt_prob on, no
    null turns into a silent 0), and our metrics' reward modes are the trainer's."""
    view = TrainerView(read_json(layouts[name].path), embeddings)
    for c in (c for s in view.samples for c in s.survivors):
        assert c["vqa_correct"] in (0, 1) and type(c["vqa_correct"]) is int
        for fields in MODE_FIELDS.values():
            for field in fields:
                assert isinstance(c[field], (int, float)) and 0.0 <= c[field] <= 1.0, (field, c[field])
        for mode in TRAINER_MODES:
            assert REWARD_CLIP[0] <= trainer_reward(mode, c) <= REWARD_CLIP[1]
        for mode, ours in REWARD_MODES.items():
            assert ours(c, RewardWeights()) == pytest.approx(trainer_reward(mode, c), abs=1e-12), mode


def test_the_old_layout_would_fall_back_to_global_rows(layouts, embeddings):
    """What the trainer did with the pool inside `query`: local positions taken for global rows."""
    data = read_json(layouts["per_query"].path)
    for entry in data.values():
        entry["query"]["candidate_pool_ids"] = entry.pop("candidate_pool_ids")
    samples = TrainerView(data, embeddings).samples
    assert not any(s.use_local_indices for s in samples)
    assert all(max(i for label in s.raw_labels for i in label) < POOL_SIZE for s in samples), "positions, not rows"
