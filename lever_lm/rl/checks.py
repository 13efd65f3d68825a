"""The rules an RL data file must follow, and everything its inputs let us recompute.

The trainer's and the format's rules (`lever_lm.rl.records`: numeric keys in beam-data order, a
non-empty first query, every candidate complete and typed, pointers of `shot_num` distinct
in-range rows that never contain the query itself, consistent scores, no ordered sequence twice in
a group), plus what the inputs and the run's meta sidecar (`lever_lm.rl.meta`) let us recompute:

* each query block against the data set and the scoring annotations (question id, image id,
  question text, the human answers -- chosen by `inputs.scoring_answers`, the generator's rule);
* with per-query pools, each record's `candidate_pool_ids` against the pools the run used, where
  they can be recomputed: the sampler cache (given here, and the one the run read, by content) or
  the `rand` sampler (`sim` pools need the embeddings: only their schema is checked);
* each candidate's answer from its raw generation (post-processing) and its accuracy from that
  answer and the human answers, in the run's eval mode;
* methods, temperatures and per-method counts against the run's proposal settings;
* no key written twice in the file (`json.load` would keep the last one silently);
* the share of failed evaluations, at most `max_failed_share`.

Any violation is an `InputError` listing the first few problems, so a DVC stage fails on a
corrupt or hand-edited file. Whether the file is the one a run wrote is `lever_lm.rl.provenance`.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lever_lm.data.vqa import VQADataset
from lever_lm.digests import file_digest
from lever_lm.errors import InputError
from lever_lm.io import read_json
from lever_lm.models.v3.pools import RandomPools, load_sampler_cache
from lever_lm.models.v3.proposals import ImageGroups, ProposalSettings
from lever_lm.rl.inputs import scoring_answers
from lever_lm.rl.meta import RunMeta
from lever_lm.rl.records import POOL_FIELD, RecordRules, entry_problems, method_label, old_pool_layout
from lever_lm.vqa.metric import MODES, prepare_answers, score_prediction
from lever_lm.vqa.postprocess import postprocess_generation
from lever_lm.vqa.relevance import relevance

MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class Expectations:
    """What the inputs say the RL file must look like; the optional parts enable deeper checks."""

    query_order: list[int]  # beam-data keys (first `limit`, without unscorable queries)
    rules: RecordRules
    dataset: VQADataset | None = None  # query blocks are compared with it
    answers: dict[int, tuple[str, ...]] = field(default_factory=dict)  # query -> scoring answers
    eval_mode: str = "always"
    proposal: ProposalSettings | None = None  # the run's proposal settings (meta sidecar)
    max_failed_share: float = 1.0
    pools: dict[int, tuple[int, ...]] | None = None  # query -> the pool it must carry, where recomputable


def load_rl_data(path: Path) -> dict:
    """The RL data file as a dict keyed by query id (missing, non-JSON, non-object or a repeated key: InputError).

    A file that holds its pools inside `query` (the layout of earlier versions) is refused in one
    line: the lineage's trainer reads `candidate_pool_ids` beside `query`, so with that file it
    would take every local pointer for a global row.
    """
    data = read_json(path, unique_keys=True)
    old = [key for key, entry in data.items() if old_pool_layout(entry)]
    if old:
        raise InputError(
            path,
            f"{len(old)} queries hold {POOL_FIELD} inside 'query' (the layout of earlier versions); the lineage's "
            "trainer reads it beside 'query' and would take the local pointers for global rows: regenerate the file",
        )
    return data


def validate_rl_data(path: Path, data: dict, expected: Expectations) -> None:
    """Raise InputError listing the problems when `data` breaks any rule; return quietly otherwise."""
    raise_problems(path, list(_problems(data, expected)))


def raise_problems(path: Path, problems: list[str]) -> None:
    """An InputError listing the first problems, if there are any."""
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise InputError(path, f"{len(problems)} problem(s): {listed}{more}")


def _problems(data: dict, expected: Expectations) -> Iterator[str]:
    keys = list(data)
    bad_keys = [k for k in keys if not (k.isascii() and k.isdigit()) or str(int(k)) != k]
    if bad_keys:
        yield f"keys that are not query indices {bad_keys[:3]} (the trainer needs numeric ids; metadata belongs in the sidecar)"
        return
    order = [int(k) for k in keys]
    if order != expected.query_order:
        missing = sorted(set(expected.query_order) - set(order))
        extra = sorted(set(order) - set(expected.query_order))
        what = f"missing {missing[:5]}" if missing else f"unexpected {extra[:5]}" if extra else "order differs"
        yield f"query set is not the beam data's keys in order ({what})"
    for key in keys:
        schema = list(entry_problems(int(key), data[key], expected.rules))
        yield from schema if schema else _recomputed_problems(int(key), data[key], expected)
    yield from _failed_share_problems(data, expected)


def _recomputed_problems(query_idx: int, entry: dict, expected: Expectations) -> Iterator[str]:
    """What the inputs let us recompute: the query block, each answer and score, the methods."""
    where = f"query {query_idx}"
    query = entry["query"]
    if expected.dataset is not None:
        item = expected.dataset[query_idx]
        for name, value in (
            ("question_id", item.question_id),
            ("image_id", item.image_id),
            ("question", item.question),
        ):
            if query[name] != value:
                yield f"{where}: query.{name} is {query[name]!r}, the data set says {value!r}"
    if (
        expected.pools is not None
        and query_idx in expected.pools
        and entry[POOL_FIELD] != list(expected.pools[query_idx])
    ):
        yield f"{where}: {POOL_FIELD} is not the pool the run's sampler gives this query"
    answers = expected.answers.get(query_idx)
    if answers is not None and list(answers) != query["gt_answers_raw"]:
        yield f"{where}: query.gt_answers_raw differ from the annotations"
    prepared = prepare_answers(list(answers if answers is not None else query["gt_answers_raw"]), expected.eval_mode)
    for n, c in enumerate(entry["pointer_candidates"]):
        if c["eval_failed"]:
            continue
        if c["vqa_pred_answer"] != postprocess_generation(c["vqa_raw_generation"]):
            yield f"{where}, candidate {n}: vqa_pred_answer is not the post-processed vqa_raw_generation"
        accuracy = score_prediction(c["vqa_pred_answer"], prepared)
        if abs(accuracy - c["vqa_acc_score"]) > 1e-9:
            yield f"{where}, candidate {n}: vqa_acc_score {c['vqa_acc_score']} but its answer scores {accuracy}"
        expected_relevance = relevance(c["vqa_pred_answer"], query["gt_answers_raw"])
        if any(abs(c[name] - value) > 1e-9 for name, value in expected_relevance.items()):
            yield f"{where}, candidate {n}: relevance fields differ from its answer's ({expected_relevance})"
    if expected.proposal is not None:
        yield from (f"{where}: {p}" for p in _method_count_problems(entry["pointer_candidates"], expected.proposal))


def _method_count_problems(candidates: list[dict], proposal: ProposalSettings) -> Iterator[str]:
    allowed = {
        "beam": proposal.num_beams,
        "random": proposal.num_random,
        "retrieval": proposal.num_retrieval,
        **{f"sample@{t:g}": proposal.num_samples_per_temp for t in proposal.temps},
    }
    counts: dict[str, int] = defaultdict(int)
    for c in candidates:
        counts[method_label(c)] += 1
    for label, n in sorted(counts.items()):
        if label not in allowed or n > allowed[label]:
            yield f"{n} '{label}' candidates, the run's settings allow {allowed.get(label, 0)}"


def _failed_share_problems(data: dict, expected: Expectations) -> Iterator[str]:
    candidates = [c for e in data.values() if isinstance(e, dict) for c in e.get("pointer_candidates") or []]
    failed = sum(1 for c in candidates if isinstance(c, dict) and c.get("eval_failed") is True)
    if candidates and failed / len(candidates) > expected.max_failed_share:
        yield (
            f"{failed} of {len(candidates)} evaluations failed ({failed / len(candidates):.1%}), more than "
            f"max_failed_share {expected.max_failed_share:.1%}: fix the cause (see eval_error) and rerun; "
            "the failed ones are retried"
        )


# -- what the run's sidecar and inputs say the file must hold -------------------------------------


def expectations_for(
    dataset: VQADataset,
    beam_queries: list[int],
    meta: RunMeta,
    val_ann_path: Path | None,
    max_failed_share: float,
    sampler_cache: Path | None = None,
) -> Expectations:
    """What the file must hold, from the inputs and the run's meta sidecar."""
    settings = meta.settings
    limit, unscorable = meta.run.limit, meta.counts.unscorable_queries
    order = [q for q in (beam_queries[:limit] if limit else beam_queries) if q not in unscorable]
    if settings.eval_mode not in MODES:
        raise InputError(None, f"the meta sidecar names an unknown eval_mode {settings.eval_mode!r}")
    answers = scoring_answers(dataset, order, val_ann_path)
    pool_size = settings.pool.pool_size if settings.pool.per_query else None
    rules = RecordRules(settings.proposal.shot_num, len(dataset), pool_size)
    expected = Expectations(order, rules, dataset, answers, settings.eval_mode, settings.proposal, max_failed_share)
    if settings.pool.per_query:
        expected = dataclasses.replace(expected, pools=_run_pools(expected, meta, sampler_cache))
    return expected


def _run_pools(expected: Expectations, meta: RunMeta, sampler_cache: Path | None):
    """The pools the run used, recomputed from the cache it read or its rand sampler; None when not possible."""
    layout, proposal = meta.settings.pool, meta.settings.proposal
    order, size = expected.query_order, int(layout.pool_size)
    if layout.sampler == "cache" and sampler_cache is not None:
        if file_digest(sampler_cache) != layout.sampler_cache:
            raise InputError(sampler_cache, "this is not the sampler cache the run read (its content differs)")
        return load_sampler_cache(sampler_cache, order, expected.rules.num_items, size)
    if layout.sampler == "rand" and expected.dataset is not None:
        image_ids = expected.dataset.image_ids
        groups = ImageGroups(image_ids, len(image_ids)) if proposal.exclude_same_image else None
        return dict(zip(order, RandomPools(size, len(image_ids), proposal.seed, groups).pools_of(order)))
    return None
