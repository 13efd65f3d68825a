"""Validate a finished RL data file against its inputs, and summarise it as metrics and plots.

The checks are the rules the GRPO trainer and the SPEC rely on: numeric keys in beam-data order,
a non-empty first query, every candidate complete and typed, pointers of `shot_num` distinct
in-range rows that never contain the query itself, scores in range and consistent
(`vqa_correct == (vqa_acc_score > 0)`), no ordered sequence twice in a group, and the query set
equal to the beam data's keys (or its first `limit` keys when the run was limited). Any violation
is an `InputError` listing the first few problems, so a DVC stage fails on a corrupt file.

Metrics answer "is this data worth training on": accuracy by method and temperature, best-of-group
and beam-top-1 accuracy, and above all the share of queries whose candidates' rewards are not all
equal -- GRPO learns nothing from a flat group.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lever_lm.data.vqa import read_json_object
from lever_lm.errors import InputError

GEN_METHODS = ("beam", "sample", "random", "retrieval")
ACCURACY_VALUES = (0.0, 0.3, 0.6, 0.9, 1.0)
MAX_LISTED_PROBLEMS = 10
CANDIDATE_FIELDS = {
    "pointer": list,
    "gen_method": str,
    "vqa_raw_generation": str,
    "vqa_pred_answer": str,
    "vqa_correct": int,
    "vqa_acc_score": (int, float),
    "eval_failed": bool,
}
OPTIONAL_NUMBER_FIELDS = ("beam_score", "logprob_score", "temperature")
# Within-group reward std lies in [0, 0.5]; flat groups (std 0) get a bin of their own.
STD_BINS = [("flat", 0.0), ("0-0.1", 0.1), ("0.1-0.2", 0.2), ("0.2-0.3", 0.3), ("0.3-0.4", 0.4), ("0.4-0.5", 0.5)]
QUERY_FIELDS = {"query_id": int, "question_id": int, "image_id": int, "question": str, "gt_answers_raw": list}


@dataclass(frozen=True)
class Expectations:
    """What the inputs say the RL file must look like."""

    query_order: list[int]  # beam-data keys (first `limit` of them when limited)
    shot_num: int
    num_items: int  # rows of the training split


def load_rl_data(path: Path) -> dict:
    """The RL data file as a dict keyed by query id (missing, non-JSON or non-object: InputError)."""
    return read_json_object(Path(path))


def validate_rl_data(path: Path, data: dict, expected: Expectations) -> None:
    """Raise InputError listing the problems when `data` breaks any rule; return quietly otherwise."""
    problems = list(_problems(data, expected))
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise InputError(path, f"{len(problems)} problem(s): {listed}{more}")


def _problems(data: dict, expected: Expectations):
    keys = list(data)
    non_numeric = [k for k in keys if not k.isdigit()]
    if non_numeric:
        yield f"non-numeric keys {non_numeric[:3]} (the trainer needs numeric query ids; metadata belongs in the sidecar)"
        return
    order = [int(k) for k in keys]
    if order != expected.query_order:
        missing = sorted(set(expected.query_order) - set(order))
        extra = sorted(set(order) - set(expected.query_order))
        what = f"missing {missing[:5]}" if missing else f"unexpected {extra[:5]}" if extra else "order differs"
        yield f"query set is not the beam data's keys in order ({what})"
    if keys and not _candidates(data[keys[0]]):
        yield f"the first query ({keys[0]}) has no candidates (the trainer requires at least one)"
    for key in keys:
        yield from _entry_problems(int(key), data[key], expected)


def _candidates(entry) -> list:
    return entry.get("pointer_candidates") or [] if isinstance(entry, dict) else []


def _entry_problems(query_idx: int, entry, expected: Expectations):
    where = f"query {query_idx}"
    if not isinstance(entry, dict) or not isinstance(entry.get("pointer_candidates"), list):
        yield f"{where}: entry must be an object with a 'pointer_candidates' list"
        return
    query = entry.get("query")
    if not isinstance(query, dict):
        yield f"{where}: missing the 'query' object"
    else:
        for name, kind in QUERY_FIELDS.items():
            if not isinstance(query.get(name), kind) or isinstance(query.get(name), bool):
                yield f"{where}: query.{name} missing or not {kind.__name__}"
        if query.get("query_id") != query_idx:
            yield f"{where}: query.query_id is {query.get('query_id')!r}"
    seen = set()
    for n, candidate in enumerate(entry["pointer_candidates"]):
        yield from (f"{where}, candidate {n}: {p}" for p in _candidate_problems(query_idx, candidate, expected))
        pointer = tuple(candidate.get("pointer") or ()) if isinstance(candidate, dict) else ()
        if pointer in seen:
            yield f"{where}, candidate {n}: pointer {list(pointer)} appears twice"
        seen.add(pointer)


def _candidate_problems(query_idx: int, c, expected: Expectations):
    if not isinstance(c, dict):
        yield "not an object"
        return
    for name, kind in CANDIDATE_FIELDS.items():
        value = c.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            yield f"{name} missing or of the wrong type"
            return
    for name in OPTIONAL_NUMBER_FIELDS:
        value = c.get(name)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
            yield f"{name} must be a finite number or null"
    pointer = c["pointer"]
    if len(pointer) != expected.shot_num:
        yield f"pointer {pointer} has {len(pointer)} ids, expected shot_num = {expected.shot_num}"
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < expected.num_items for i in pointer):
        yield f"pointer {pointer} has ids outside 0..{expected.num_items - 1}"
    if query_idx in pointer:
        yield f"pointer {pointer} contains the query itself"
    if len(set(pointer)) != len(pointer):
        yield f"pointer {pointer} repeats an id"
    method = c["gen_method"]
    if method not in GEN_METHODS:
        yield f"gen_method {method!r} is not one of {', '.join(GEN_METHODS)}"
    if method == "beam" and not isinstance(c.get("beam_rank"), int):
        yield "a beam candidate needs an integer beam_rank"
    if method == "sample" and not (isinstance(c.get("temperature"), (int, float)) and c["temperature"] > 0):
        yield "a sample candidate needs a temperature > 0"
    acc = c["vqa_acc_score"]
    if not any(abs(acc - v) < 1e-6 for v in ACCURACY_VALUES):
        yield f"vqa_acc_score {acc} is not one of {ACCURACY_VALUES}"
    if c["vqa_correct"] != (1 if acc > 0 else 0):
        yield f"vqa_correct {c['vqa_correct']} disagrees with vqa_acc_score {acc}"
    if c["eval_failed"] and acc != 0:
        yield "a failed evaluation must score 0"


# -- metrics --------------------------------------------------------------------------------------


def method_label(candidate: dict) -> str:
    """`beam`, `random`, or `sample@T` -- the groups the metrics and plots compare."""
    if candidate["gen_method"] == "sample":
        return f"sample@{candidate['temperature']:g}"
    return candidate["gen_method"]


def compute_metrics(data: dict, meta: dict | None = None) -> dict:
    """The numbers `dvc metrics show` / `dvc exp show` compare (all plain floats and ints)."""
    groups = [[c for c in entry["pointer_candidates"]] for entry in data.values()]
    rewards = [[c["vqa_acc_score"] for c in g] for g in groups]
    sizes = [len(g) for g in groups]
    all_candidates = [c for g in groups for c in g]
    non_empty = [r for r in rewards if r]
    metrics = {
        "queries": len(groups),
        "candidates": len(all_candidates),
        "candidates_per_query": {
            "mean": _mean(sizes),
            "min": min(sizes, default=0),
            "max": max(sizes, default=0),
        },
        "failed_evaluations": sum(1 for c in all_candidates if c["eval_failed"]),
        "accuracy": _mean([c["vqa_acc_score"] for c in all_candidates]),
        "share_correct": _mean([c["vqa_correct"] for c in all_candidates]),
        "query_accuracy": _mean([_mean(r) for r in non_empty]),
        "best_of_group_accuracy": _mean([max(r) for r in non_empty]),
        "beam_top1_accuracy": _mean(
            [c["vqa_acc_score"] for c in all_candidates if c["gen_method"] == "beam" and c.get("beam_rank") == 0]
        ),
        "share_non_flat_groups": _mean([1.0 if len(set(r)) > 1 else 0.0 for r in non_empty]),
        "mean_group_reward_std": _mean([statistics.pstdev(r) for r in non_empty]),
        "by_method": _by_label(all_candidates, lambda c: c["gen_method"]),
        "by_label": _by_label(all_candidates, method_label),
    }
    duplicates = ((meta or {}).get("counts") or {}).get("duplicates_dropped")
    if duplicates is not None:
        metrics["duplicates_dropped"] = {m: duplicates.get(m, 0) for m in sorted(duplicates)}
        metrics["duplicates_dropped_total"] = sum(duplicates.values())
    return metrics


def _by_label(candidates: list[dict], label) -> dict:
    buckets: dict[str, list[dict]] = defaultdict(list)
    for c in candidates:
        buckets[label(c)].append(c)
    return {
        name: {
            "candidates": len(items),
            "accuracy": _mean([c["vqa_acc_score"] for c in items]),
            "share_correct": _mean([c["vqa_correct"] for c in items]),
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
            {"method": label, "reward": value, "share": round(n / total, 6), "count": n} for value, n in by_value.items()
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
    return {"reward_distribution": distribution, "group_reward_std": histogram}


def _nearest_accuracy(value: float) -> float:
    return min(ACCURACY_VALUES, key=lambda v: abs(v - value))


def write_plots(plots: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """CSV files for `dvc plots show` and PNG images that render without network access."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in plots.items():
        path = out_dir / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["empty"])
            writer.writeheader()
            writer.writerows(rows)
        written.append(path)

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
    return written


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return path


# -- the stage ------------------------------------------------------------------------------------


def run_validation(
    rl_path: Path, beam_data_path: Path, dataset_paths, metrics_path: Path, plots_dir: Path
) -> dict:
    """Check the RL file against its inputs, then write metrics JSON and plots; return the metrics."""
    from lever_lm.data.beam_data import load_beam_data
    from lever_lm.data.vqa import VQADataset
    from lever_lm.rl.output import meta_path_for

    dataset = VQADataset.load(dataset_paths.train_ques_path, dataset_paths.train_ann_path, dataset_paths.train_image_root)
    beam = load_beam_data(beam_data_path, len(dataset))
    meta_path = meta_path_for(rl_path)
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    limit = ((meta or {}).get("run") or {}).get("limit")
    shot_num = (((meta or {}).get("settings") or {}).get("proposal") or {}).get("shot_num") or beam.shot_num
    expected = Expectations(beam.query_ids[:limit] if limit else list(beam.query_ids), shot_num, len(dataset))
    data = load_rl_data(rl_path)
    validate_rl_data(rl_path, data, expected)
    metrics = compute_metrics(data, meta)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_plots(plot_data(data), plots_dir)
    return metrics


def main(argv: list[str] | None = None) -> None:
    """`python -m lever_lm.rl.validate --rl_data RL.json --beam_data B.json --train_* ... --metrics M.json --plots DIR`."""
    import argparse

    from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
    from lever_lm.errors import exit_on_input_error

    parser = argparse.ArgumentParser(description="Validate an RL data file and write its metrics and plots.")
    parser.add_argument("--rl_data", type=Path, required=True, help="the final RL data JSON")
    parser.add_argument("--beam_data", type=Path, required=True, help="the beam data JSON it was generated from")
    add_dataset_arguments(parser)
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, required=True, help="directory for plot CSVs and PNGs")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        metrics = run_validation(args.rl_data, args.beam_data, dataset_paths_from_args(args), args.metrics, args.plots)
    print(
        f"valid: {metrics['queries']} queries, {metrics['candidates']} candidates; accuracy {metrics['accuracy']:.3f}, "
        f"non-flat groups {metrics['share_non_flat_groups']:.1%}"
    )


if __name__ == "__main__":
    main()
