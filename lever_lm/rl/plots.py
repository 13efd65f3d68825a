"""Plots of an RL data file for `dvc plots show`: CSV rows and PNG images that render offline.

The reward distribution per method and temperature, the histogram of within-group reward std
(flat groups give GRPO no signal), and the mean `vqa_gt_prob` per accuracy value.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from lever_lm.io import atomic_output
from lever_lm.rl.records import ACCURACY_VALUES, GT_PROB_FIELD, method_label

# Within-group reward std lies in [0, 0.5]; flat groups (std 0) get a bin of their own.
STD_BINS = [("flat", 0.0), ("0-0.1", 0.1), ("0.1-0.2", 0.2), ("0.2-0.3", 0.3), ("0.3-0.4", 0.4), ("0.4-0.5", 0.5)]


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


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0
