"""Validate a finished RL data file against its inputs, and summarise it as metrics and plots.

The checks are the trainer's and the format's rules (`lever_lm.rl.records`: numeric keys in
beam-data order, a non-empty first query, every candidate complete and typed, pointers of
`shot_num` distinct in-range rows that never contain the query itself, consistent scores, no
ordered sequence twice in a group), plus everything the inputs let us recompute:

* each query block against the data set and the scoring annotations (question id, image id,
  question text, the human answers);
* with per-query pools, each query's `candidate_pool_ids` against the pools the run used, where
  they can be recomputed: the sampler cache (given here, and the one the run read, by content) or
  the `rand` sampler (`sim` pools need the embeddings: only their schema is checked);
* each candidate's answer from its raw generation (post-processing) and its accuracy from that
  answer and the human answers, in the run's eval mode (from the meta sidecar);
* methods, temperatures and per-method counts against the run's proposal settings;
* no key written twice in the file (`json.load` would keep the last one silently);
* the share of failed evaluations, at most `max_failed_share`.

Any violation is an `InputError` listing the first few problems, so a DVC stage fails on a
corrupt or hand-edited file.

Metrics answer "is this data worth training on". `metrics.json` holds the headline numbers that
`dvc exp show` compares (queries, candidates, accuracy, query-level, best-of-group and beam-top-1
accuracy, the share of non-flat groups, the mean group std -- GRPO learns nothing from a flat
group -- and the share of ICD slots the ten most used ICDs fill, which tells a global pool's hubs
from per-query pools); the breakdowns by method and temperature go to a second file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lever_lm.data.beam_data import load_beam_data
from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.vqa import VQADataset, load_annotations
from lever_lm.digests import file_digest
from lever_lm.errors import InputError
from lever_lm.io import atomic_output, read_json
from lever_lm.models.v3.pools import RandomPools, load_sampler_cache
from lever_lm.models.v3.proposals import ImageGroups
from lever_lm.rl.output import meta_path_for
from lever_lm.rl.records import (
    ACCURACY_VALUES,
    GLOBAL_POINTER_FIELD,
    GT_PROB_FIELD,
    POOL_FIELD,
    RecordRules,
    entry_problems,
)
from lever_lm.rl.rewards import GT_PROB_MODES, REWARD_MODES, RewardWeights
from lever_lm.vqa.metric import MODES, prepare_answers, score_prediction
from lever_lm.vqa.postprocess import postprocess_generation
from lever_lm.vqa.relevance import relevance

MAX_LISTED_PROBLEMS = 10
DEFAULT_MAX_FAILED_SHARE = 0.05
# Within-group reward std lies in [0, 0.5]; flat groups (std 0) get a bin of their own.
STD_BINS = [("flat", 0.0), ("0-0.1", 0.1), ("0.1-0.2", 0.2), ("0.2-0.3", 0.3), ("0.3-0.4", 0.4), ("0.4-0.5", 0.5)]


@dataclass(frozen=True)
class Expectations:
    """What the inputs say the RL file must look like; the optional parts enable deeper checks."""

    query_order: list[int]  # beam-data keys (first `limit`, without unscorable queries)
    rules: RecordRules
    dataset: VQADataset | None = None  # query blocks are compared with it
    answers: dict[int, tuple[str, ...]] = field(default_factory=dict)  # query -> scoring answers
    eval_mode: str = "always"
    proposal: dict | None = None  # the run's proposal settings (meta sidecar)
    max_failed_share: float = 1.0
    pools: dict[int, tuple[int, ...]] | None = None  # query -> the pool it must carry, where recomputable


def load_rl_data(path: Path) -> dict:
    """The RL data file as a dict keyed by query id (missing, non-JSON, non-object or a repeated key: InputError)."""
    return read_json(path, unique_keys=True)


def validate_rl_data(path: Path, data: dict, expected: Expectations) -> None:
    """Raise InputError listing the problems when `data` breaks any rule; return quietly otherwise."""
    problems = list(_problems(data, expected))
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
        and query[POOL_FIELD] != list(expected.pools[query_idx])
    ):
        yield f"{where}: query.{POOL_FIELD} is not the pool the run's sampler gives this query"
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


def _method_count_problems(candidates: list[dict], proposal: dict) -> Iterator[str]:
    temps = [float(t) for t in proposal.get("temps", [])]
    allowed = {
        "beam": proposal.get("num_beams", 0),
        "random": proposal.get("num_random", 0),
        "retrieval": proposal.get("num_retrieval", 0),
        **{f"sample@{t:g}": proposal.get("num_samples_per_temp", 0) for t in temps},
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


# -- metrics --------------------------------------------------------------------------------------


def method_label(candidate: dict) -> str:
    """`beam`, `random`, `retrieval`, or `sample@T` -- the groups the metrics and plots compare."""
    if candidate["gen_method"] == "sample":
        return f"sample@{candidate['temperature']:g}"
    return candidate["gen_method"]


def compute_metrics(data: dict, weights: RewardWeights = RewardWeights()) -> dict:
    """The headline that `dvc exp show` compares, kept to one screen (plain floats and ints): queries,
    candidates, accuracy (per candidate and per query), best-of-group and beam-top-1 accuracy, the
    share of non-flat groups and the mean group std (GRPO learns only from groups whose rewards
    differ), and with `vqa_gt_prob` its Spearman correlation with accuracy. Short names, so that
    `dvc exp show --only-changed` fits 160 columns; the rest is in the breakdown."""
    rewards = [[c["vqa_acc_score"] for c in entry["pointer_candidates"]] for entry in data.values()]
    rewards = [r for r in rewards if r]
    all_candidates = [c for entry in data.values() for c in entry["pointer_candidates"]]
    metrics = {
        "queries": len(data),
        "candidates": len(all_candidates),
        "accuracy": _mean(c["vqa_acc_score"] for c in all_candidates),
        "query_acc": _mean(_mean(r) for r in rewards),
        "best_acc": _mean(max(r) for r in rewards),
        "top1_acc": _mean(
            c["vqa_acc_score"] for c in all_candidates if c["gen_method"] == "beam" and c.get("beam_rank") == 0
        ),
        "non_flat": _share_non_flat(rewards),
        "group_std": _mean(statistics.pstdev(r) for r in rewards),
    }
    with_gt = [c for c in all_candidates if c.get(GT_PROB_FIELD) is not None]
    if with_gt:
        xs, ys = [c[GT_PROB_FIELD] for c in with_gt], [c["vqa_acc_score"] for c in with_gt]
        metrics["gt_rho"] = round(spearman(xs, ys), 6)
    return metrics


def icd_spread(candidates: list[dict]) -> dict:
    """How spread the chosen ICDs (global rows) are: distinct ones, and the share of ICD slots the
    ten most used fill. A pointer over the global pool tends to favour a few hub items; per-query
    pools spread the choice."""
    usage = Counter(i for c in candidates for i in c.get(GLOBAL_POINTER_FIELD, c["pointer"]))
    slots = sum(usage.values())
    return {
        "distinct_icds": len(usage),
        "top10_icd_share": round(sum(n for _, n in usage.most_common(10)) / slots, 6) if slots else 0.0,
    }


def reward_mode_metrics(data: dict, weights: RewardWeights, with_gt_prob: bool) -> dict:
    """Per reward mode of the trainer: the share of groups whose rewards differ, and the mean group std.
    The gt_prob modes only when the file has `vqa_gt_prob` (otherwise they equal hard rewards)."""
    groups = [entry["pointer_candidates"] for entry in data.values() if entry["pointer_candidates"]]
    modes = {m: f for m, f in REWARD_MODES.items() if with_gt_prob or m not in GT_PROB_MODES}
    out = {}
    for name, reward in modes.items():
        values = [[round(reward(c, weights), 9) for c in group] for group in groups]
        out[name] = {"non_flat": _share_non_flat(values), "group_std": _mean(statistics.pstdev(v) for v in values)}
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties get their average rank); 0 when either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = math.sqrt(math.fsum((a - mx) ** 2 for a in rx) * math.fsum((b - my) ** 2 for b in ry))
    return cov / norm if norm > 0 else 0.0


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _share_non_flat(groups: list[list[float]]) -> float:
    return _mean(1.0 if len(set(g)) > 1 else 0.0 for g in groups)


def compute_breakdown(data: dict, meta: dict | None = None) -> dict:
    """The detail behind the headline: per method and temperature, group sizes, duplicates dropped."""
    all_candidates = [c for entry in data.values() for c in entry["pointer_candidates"]]
    sizes = [len(entry["pointer_candidates"]) for entry in data.values()]
    with_gt = any(c.get(GT_PROB_FIELD) is not None for c in all_candidates)
    breakdown = {
        "failed_evaluations": sum(1 for c in all_candidates if c["eval_failed"]),
        "candidates_per_query": {"mean": _mean(sizes), "min": min(sizes, default=0), "max": max(sizes, default=0)},
        "share_correct": _mean(c["vqa_correct"] for c in all_candidates),
        "by_method": _by_label(all_candidates, lambda c: c["gen_method"]),
        "by_label": _by_label(all_candidates, method_label),
        "icds": icd_spread(all_candidates),
    }
    breakdown["reward_modes"] = reward_mode_metrics(data, RewardWeights(), with_gt_prob=with_gt)
    if with_gt:
        breakdown["gt_prob"] = gt_prob_breakdown(data)
    counts = (meta or {}).get("counts") or {}
    if "duplicates_dropped" in counts:
        breakdown["duplicates_dropped"] = dict(sorted(counts["duplicates_dropped"].items()))
    if counts.get("unscorable_queries"):
        breakdown["unscorable_queries"] = len(counts["unscorable_queries"])
    return breakdown


def gt_prob_breakdown(data: dict) -> dict:
    """Does `vqa_gt_prob` carry accuracy's signal, and more: its mean over all, on correct and on
    incorrect candidates, and among the groups whose accuracy is flat, the share where it differs."""
    candidates = [c for e in data.values() for c in e["pointer_candidates"] if c.get(GT_PROB_FIELD) is not None]
    flat = [
        e["pointer_candidates"]
        for e in data.values()
        if e["pointer_candidates"] and len({c["vqa_acc_score"] for c in e["pointer_candidates"]}) == 1
    ]
    varied = [len({round(c.get(GT_PROB_FIELD) or 0.0, 9) for c in group}) > 1 for group in flat]
    return {
        "mean": _mean(c[GT_PROB_FIELD] for c in candidates),
        "mean_when_correct": _mean(c[GT_PROB_FIELD] for c in candidates if c["vqa_correct"]),
        "mean_when_incorrect": _mean(c[GT_PROB_FIELD] for c in candidates if not c["vqa_correct"]),
        "accuracy_flat_groups": len(flat),
        "share_of_them_where_gt_prob_differs": _mean(1.0 if v else 0.0 for v in varied),
    }


def _by_label(candidates: list[dict], label) -> dict:
    buckets: dict[str, list[dict]] = defaultdict(list)
    for c in candidates:
        buckets[label(c)].append(c)
    return {
        name: {
            "candidates": len(items),
            "accuracy": _mean(c["vqa_acc_score"] for c in items),
            "share_correct": _mean(c["vqa_correct"] for c in items),
        }
        for name, items in sorted(buckets.items())
    }


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else 0.0


# -- plots ----------------------------------------------------------------------------------------


def plot_data(data: dict) -> dict[str, list[dict]]:
    """Rows for DVC's plot files: reward distribution per method label, group-std histogram."""
    counts: dict[str, dict[float, int]] = defaultdict(lambda: {v: 0 for v in ACCURACY_VALUES})
    for entry in data.values():
        for c in entry["pointer_candidates"]:
            counts[method_label(c)][_nearest_accuracy(c["vqa_acc_score"])] += 1
    distribution = []
    for label, by_value in sorted(counts.items()):
        total = sum(by_value.values())
        distribution += [
            {"method": label, "reward": value, "share": round(n / total, 6), "count": n}
            for value, n in by_value.items()
        ]
    stds = [
        statistics.pstdev([c["vqa_acc_score"] for c in entry["pointer_candidates"]])
        for entry in data.values()
        if entry["pointer_candidates"]
    ]
    histogram = [{"group_reward_std": label, "queries": 0} for label, _ in STD_BINS]
    for std in stds:
        bin_index = next(i for i, (_, upper) in enumerate(STD_BINS) if min(std, 0.5) <= upper)
        histogram[bin_index]["queries"] += 1
    plots = {"reward_distribution": distribution, "group_reward_std": histogram}
    by_accuracy: dict[float, list[float]] = defaultdict(list)
    for entry in data.values():
        for c in entry["pointer_candidates"]:
            if c.get(GT_PROB_FIELD) is not None:
                by_accuracy[_nearest_accuracy(c["vqa_acc_score"])].append(c[GT_PROB_FIELD])
    plots["gt_prob_by_accuracy"] = [  # all zero counts when the run had --no_gt_prob
        {"accuracy": a, "mean_gt_prob": _mean(by_accuracy[a]), "candidates": len(by_accuracy[a])}
        for a in ACCURACY_VALUES
    ]
    return plots


def _nearest_accuracy(value: float) -> float:
    return min(ACCURACY_VALUES, key=lambda v: abs(v - value))


def write_plots(plots: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """CSV files for `dvc plots show` and PNG images that render without network access."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, rows in plots.items():
        with atomic_output(out_dir / f"{name}.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["empty"])
            writer.writeheader()
            writer.writerows(rows)
        written.append(out_dir / f"{name}.csv")

    rows = plots["reward_distribution"]
    labels = sorted({r["method"] for r in rows})
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["method"] == label]
        axis.bar([k + i * width for k in range(len(mine))], [r["share"] for r in mine], width, label=label)
    axis.set_xticks([k + 0.4 - width / 2 for k in range(len(ACCURACY_VALUES))], [f"{v:g}" for v in ACCURACY_VALUES])
    axis.set_xlabel("VQA accuracy of a candidate")
    axis.set_ylabel("share of the method's candidates")
    axis.set_title("Reward distribution by method and temperature")
    axis.legend()
    figure.tight_layout()
    written.append(_save(figure, out_dir / "reward_distribution.png"))

    rows = plots["group_reward_std"]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar([r["group_reward_std"] for r in rows], [r["queries"] for r in rows], color="tab:purple")
    axis.set_xlabel("within-group reward std (flat groups give GRPO no signal)")
    axis.set_ylabel("queries")
    axis.set_title("Group reward variance")
    figure.tight_layout()
    written.append(_save(figure, out_dir / "group_reward_std.png"))

    if "gt_prob_by_accuracy" in plots:
        rows = plots["gt_prob_by_accuracy"]
        computed = any(r["candidates"] for r in rows)
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.bar([f"{r['accuracy']:g}" for r in rows], [r["mean_gt_prob"] for r in rows], color="tab:green")
        for k, r in enumerate(rows):
            axis.annotate(f"n={r['candidates']}", (k, r["mean_gt_prob"]), ha="center", va="bottom", fontsize=8)
        axis.set_xlabel("VQA accuracy of a candidate")
        axis.set_ylabel("mean vqa_gt_prob")
        axis.set_title("Expected accuracy (gt_prob) against accuracy" + ("" if computed else ": not computed"))
        figure.tight_layout()
        written.append(_save(figure, out_dir / "gt_prob_by_accuracy.png"))
    return written


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return path


# -- the stage ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationOutputs:
    metrics: Path
    breakdown: Path
    plots: Path


def run_validation(
    rl_path: Path,
    beam_data_path: Path,
    dataset_paths: DatasetPaths,
    outputs: ValidationOutputs,
    val_ann_path: Path | None = None,
    max_failed_share: float = DEFAULT_MAX_FAILED_SHARE,
    sampler_cache: Path | None = None,
) -> dict:
    """Check the RL file against its inputs, then write metrics, the breakdown and plots; return the metrics."""
    dataset = dataset_paths.load()
    beam = load_beam_data(beam_data_path, len(dataset))
    meta_path = meta_path_for(rl_path)
    meta = read_json(meta_path) if meta_path.is_file() else {}
    data = load_rl_data(rl_path)
    expected = expectations_for(dataset, beam.query_ids, beam.shot_num, meta, val_ann_path, max_failed_share)
    expected = with_pools(expected, meta, data, sampler_cache)
    validate_rl_data(rl_path, data, expected)
    metrics = compute_metrics(data)
    _write_json(outputs.metrics, metrics)
    _write_json(outputs.breakdown, compute_breakdown(data, meta))
    write_plots(plot_data(data), outputs.plots)
    return metrics


def expectations_for(
    dataset: VQADataset,
    beam_queries: list[int],
    beam_shot_num: int,
    meta: dict,
    val_ann_path: Path | None,
    max_failed_share: float,
) -> Expectations:
    """What the file must hold, from the inputs and the run's meta sidecar (when there is one)."""
    run, settings = meta.get("run") or {}, meta.get("settings") or {}
    limit = run.get("limit")
    unscorable = {int(q) for q in ((meta.get("counts") or {}).get("unscorable_queries") or {})}
    order = [q for q in (beam_queries[:limit] if limit else beam_queries) if q not in unscorable]
    proposal = settings.get("proposal")
    shot_num = (proposal or {}).get("shot_num") or beam_shot_num
    eval_mode = settings.get("eval_mode", "always")
    if eval_mode not in MODES:
        raise InputError(None, f"the meta sidecar names an unknown eval_mode {eval_mode!r}")
    val = load_annotations(val_ann_path) if val_ann_path else {}
    answers = {}
    for q in order:
        record = val.get(dataset[q].question_id)
        answers[q] = tuple(str(a["answer"]) for a in record["answers"]) if record else dataset[q].answers
    rules = RecordRules(shot_num, len(dataset))
    return Expectations(order, rules, dataset, answers, eval_mode, proposal, max_failed_share)


def with_pools(expected: Expectations, meta: dict, data: dict, sampler_cache: Path | None) -> Expectations:
    """The expectations completed with the run's pool layout (meta sidecar; without one, the file's
    first record) and, where they can be recomputed, the pools themselves."""
    pool = (meta.get("settings") or {}).get("pool")
    if pool is None:  # no sidecar: the file says which layout it has
        first = next(iter(data.values()), None)
        pool_ids = first.get("query", {}).get(POOL_FIELD) if isinstance(first, dict) else None
        pool = {"pool": "per_query", "pool_size": len(pool_ids)} if isinstance(pool_ids, list) else {"pool": "global"}
    if pool.get("pool") != "per_query":
        return expected
    rules = dataclasses.replace(expected.rules, pool_size=int(pool["pool_size"]))
    return dataclasses.replace(expected, rules=rules, pools=_run_pools(expected, pool, meta, sampler_cache))


def _run_pools(expected: Expectations, pool: dict, meta: dict, sampler_cache: Path | None):
    """The pools the run used, recomputed from the cache it read or its rand sampler; None when not possible."""
    sampler, order, size = pool.get("sampler"), expected.query_order, int(pool["pool_size"])
    if sampler == "cache" and sampler_cache is not None:
        if file_digest(sampler_cache) != pool.get("sampler_cache"):
            raise InputError(sampler_cache, "this is not the sampler cache the run read (its content differs)")
        return load_sampler_cache(sampler_cache, order, expected.rules.num_items, size)
    proposal = (meta.get("settings") or {}).get("proposal") or {}
    if sampler == "rand" and expected.dataset is not None and "seed" in proposal:
        image_ids = expected.dataset.image_ids
        groups = ImageGroups(image_ids, len(image_ids)) if proposal.get("exclude_same_image") else None
        return dict(zip(order, RandomPools(size, len(image_ids), int(proposal["seed"]), groups).pools_of(order)))
    return None


def _write_json(path: Path, value: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """`python -m lever_lm.rl.validate --rl_data RL.json --beam_data B.json --train_* ... --metrics M.json ...`."""
    import argparse

    from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
    from lever_lm.errors import exit_on_input_error

    parser = argparse.ArgumentParser(description="Validate an RL data file and write its metrics and plots.")
    parser.add_argument("--rl_data", type=Path, required=True, help="the final RL data JSON")
    parser.add_argument("--beam_data", type=Path, required=True, help="the beam data JSON it was generated from")
    add_dataset_arguments(parser)
    parser.add_argument("--val_ann_path", type=Path, help="the scoring annotations the run was given, if any")
    parser.add_argument(
        "--sampler_cache",
        type=Path,
        help="the sampler cache the run read (per-query pools): pools are checked against it",
    )
    parser.add_argument("--metrics", type=Path, required=True, help="headline metrics JSON to write")
    parser.add_argument("--breakdown", type=Path, required=True, help="per-method / per-temperature metrics JSON")
    parser.add_argument("--plots", type=Path, required=True, help="directory for plot CSVs and PNGs")
    parser.add_argument(
        "--max_failed_share",
        type=float,
        default=DEFAULT_MAX_FAILED_SHARE,
        help="fail when more than this share of the evaluations failed (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    with exit_on_input_error():
        if not 0.0 <= args.max_failed_share <= 1.0 or math.isnan(args.max_failed_share):
            raise InputError(None, f"--max_failed_share must be in [0, 1], got {args.max_failed_share}")
        outputs = ValidationOutputs(args.metrics, args.breakdown, args.plots)
        paths = dataset_paths_from_args(args)
        metrics = run_validation(
            args.rl_data, args.beam_data, paths, outputs, args.val_ann_path, args.max_failed_share, args.sampler_cache
        )
    print(
        f"valid: {metrics['queries']} queries, {metrics['candidates']} candidates; accuracy {metrics['accuracy']:.3f}, "
        f"non-flat groups {metrics['non_flat']:.1%}"
    )


if __name__ == "__main__":
    main()
