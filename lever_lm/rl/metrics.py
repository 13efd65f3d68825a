"""Metrics of an RL data file: is this data worth training on?

`metrics.json` holds the headline numbers that `dvc exp show` compares (queries, candidates,
accuracy, query-level, best-of-group and beam-top-1 accuracy, the share of non-flat groups, the
mean group std -- GRPO learns nothing from a flat group -- and with `vqa_gt_prob` its rank
correlation with accuracy); the breakdowns by method and temperature, the reward modes of the
trainer, the ICD spread (which tells a global pool's hubs from per-query pools) and the dense
field's signal go to a second file.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

from lever_lm.rl.meta import RunMeta
from lever_lm.rl.records import GLOBAL_POINTER_FIELD, GT_PROB_FIELD, MethodTotals, method_label, method_of
from lever_lm.rl.rewards import GT_PROB_MODES, REWARD_MODES, RewardWeights


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


def compute_breakdown(data: dict, meta: RunMeta | None = None) -> dict:
    """The detail behind the headline: per method and temperature, group sizes, duplicates dropped."""
    all_candidates = [c for entry in data.values() for c in entry["pointer_candidates"]]
    sizes = [len(entry["pointer_candidates"]) for entry in data.values()]
    with_gt = any(c.get(GT_PROB_FIELD) is not None for c in all_candidates)
    breakdown = {
        "failed_evaluations": sum(1 for c in all_candidates if c["eval_failed"]),
        "candidates_per_query": {"mean": _mean(sizes), "min": min(sizes, default=0), "max": max(sizes, default=0)},
        "share_correct": _mean(c["vqa_correct"] for c in all_candidates),
        "by_method": by_group(data, method_of),
        "by_label": by_group(data, method_label),
        "icds": icd_spread(all_candidates),
    }
    breakdown["reward_modes"] = reward_mode_metrics(data, RewardWeights(), with_gt_prob=with_gt)
    if with_gt:
        breakdown["gt_prob"] = gt_prob_breakdown(data)
    if meta is not None:
        breakdown["duplicates_dropped"] = dict(sorted(meta.counts.duplicates_dropped.items()))
        if meta.counts.unscorable_queries:
            breakdown["unscorable_queries"] = len(meta.counts.unscorable_queries)
    return breakdown


def by_group(data: dict, label) -> dict:
    """Candidates, accuracy and share correct per group (`records.MethodTotals`, rounded for reading)."""
    totals = MethodTotals(label=label)
    for entry in data.values():
        totals.add(entry)
    return {g: {k: round(v, 6) for k, v in values.items()} for g, values in totals.by_group().items()}


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


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 6) if values else 0.0
