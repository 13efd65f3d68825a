"""The RL record: the one place that knows its field names, how a record is built, and its schema.

A query's record (one value of the final JSON, one journal line's `entry`; docs/formats.md §5):

    {"query": {"query_id", "question_id", "image_id", "question", "gt_answers_raw"},
     ["candidate_pool_ids": [...],]
     "pointer_candidates": [{"pointer", ["pointer_global"], "gen_method", "beam_rank", "beam_score",
                             "logprob_score", "temperature", "vqa_raw_generation", "vqa_pred_answer",
                             "vqa_correct", "vqa_acc_score", "vqa_eval_mode", "eval_failed", ["eval_error"],
                             "vqa_gt_prob", "vqa_rel_token_f1", "vqa_rel_edit_sim", "vqa_rel_score"}, ...]}

With per-query pools (docs/formats.md §7) the record carries its pool, `candidate_pool_ids`
(global rows in pool order), beside `query` and `pointer_candidates` -- where the lineage's
trainer reads it (and where its k64 generator writes it); a candidate's `pointer` holds positions
in that pool and `pointer_global` the global rows (`pointer_global[i] ==
candidate_pool_ids[pointer[i]]`). With the global pool neither field exists and `pointer` holds
global rows. A pool inside `query` (the layout of earlier versions) is refused: the trainer would
not see it and would read the positions as global rows.

The generator builds records with `entry_record`, `query_record` and `candidate_record`; the journal checks every
line it reads with `entry_problems`; the validator applies the same rules to the final file, and
the final-JSON writer and the validator count with `MethodTotals`. The field names are the
lineage trainer's contract: they never change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from lever_lm.io import is_json_number
from lever_lm.models.v3.proposals import METHODS, Candidate
from lever_lm.vqa.backends.base import Generation
from lever_lm.vqa.expected_accuracy import expected_accuracy
from lever_lm.vqa.metric import PreparedAnswers, score_prediction
from lever_lm.vqa.relevance import FIELDS as RELEVANCE_FIELDS
from lever_lm.vqa.relevance import relevance

GEN_METHODS = METHODS  # "beam", "sample", "random", "retrieval": the proposal methods, in priority order
EVAL_MODE_NAME = "vqaEval"
ACCURACY_VALUES = (0.0, 0.3, 0.6, 0.9, 1.0)
QUERY_FIELDS = {"query_id": int, "question_id": int, "image_id": int, "question": str, "gt_answers_raw": list}
CANDIDATE_FIELDS = {
    "pointer": list,
    "gen_method": str,
    "vqa_raw_generation": str,
    "vqa_pred_answer": str,
    "vqa_correct": int,
    "vqa_acc_score": (int, float),
    "vqa_eval_mode": str,
    "eval_failed": bool,
}
OPTIONAL_NUMBER_FIELDS = ("beam_rank", "beam_score", "logprob_score", "temperature")
GT_PROB_FIELD = "vqa_gt_prob"  # the dense fields the lineage's trainer reads (docs/formats.md §7)
DENSE_FIELDS = (GT_PROB_FIELD, *RELEVANCE_FIELDS)
POOL_FIELD = "candidate_pool_ids"  # beside "query", per-query pools only
GLOBAL_POINTER_FIELD = "pointer_global"  # candidate, per-query pools only


# -- building -------------------------------------------------------------------------------------


def entry_record(query: dict, candidates: list[dict], pool: Sequence[int] | None = None) -> dict:
    """A query's record in the lineage's key order: `query`, with per-query pools `candidate_pool_ids`
    (the query's own pool, global rows in pool order), `pointer_candidates`."""
    entry = {"query": query}
    if pool is not None:
        entry[POOL_FIELD] = list(pool)
    entry["pointer_candidates"] = candidates
    return entry


def query_record(query_idx: int, question_id: int, image_id: int, question: str, answers: Sequence[str]) -> dict:
    """The `query` block of a record."""
    return {
        "query_id": query_idx,
        "question_id": question_id,
        "image_id": image_id,
        "question": question,
        "gt_answers_raw": list(answers),
    }


def candidate_record(
    candidate: Candidate,
    generation: Generation,
    prepared: PreparedAnswers,
    answers: Sequence[str],
    replies: Sequence[str] | None,
    pool: Sequence[int] | None = None,
) -> dict:
    """One `pointer_candidates` entry; a failed evaluation scores 0 and says why in `eval_error`.

    `answers`: the query's human answers (for relevance); `replies`: the distinct answers whose
    likelihoods the backend was asked for (None: `vqa_gt_prob` switched off, written as null);
    `pool`: the query's own pool, whose positions the pointer holds (per-query pools only).
    """
    failed = generation.error is not None
    accuracy = 0.0 if failed else score_prediction(generation.answer, prepared)
    record = {"pointer": list(candidate.pointer)}
    if pool is not None:
        record[GLOBAL_POINTER_FIELD] = [pool[i] for i in candidate.pointer]
    record |= {
        "gen_method": candidate.gen_method,
        "beam_rank": candidate.beam_rank,
        "beam_score": candidate.beam_score,
        "logprob_score": candidate.logprob_score,
        "temperature": candidate.temperature,
        "vqa_raw_generation": generation.raw,
        "vqa_pred_answer": generation.answer,
        "vqa_correct": 1 if accuracy > 0 else 0,
        "vqa_acc_score": accuracy,
        "vqa_eval_mode": EVAL_MODE_NAME,
        "eval_failed": failed,
    }
    if failed:
        record["eval_error"] = generation.error
    record[GT_PROB_FIELD] = gt_prob(generation, prepared, replies)
    record.update(relevance(generation.answer, answers))
    return record


def gt_prob(generation: Generation, prepared: PreparedAnswers, replies: Sequence[str] | None) -> float | None:
    """The candidate's expected accuracy over the human answers, or None when it was not computed."""
    if replies is None or generation.error is not None or generation.reply_logprobs is None:
        return None
    return expected_accuracy(replies, generation.reply_logprobs, prepared)


def failed_candidates(entry: dict) -> int:
    """How many of a record's candidates could not be evaluated."""
    return sum(1 for c in entry["pointer_candidates"] if c["eval_failed"])


def needs_retry(entry: dict, stats: dict) -> bool:
    """A result a later run should compute again: a failed evaluation, or an unreadable query image."""
    return bool(stats.get("query_error")) or failed_candidates(entry) > 0


# -- the schema -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordRules:
    """What the inputs say a record must look like (the journal checks every line it reads with these)."""

    shot_num: int
    num_items: int  # rows of the training split: global pointers lie in 0..num_items-1
    pool_size: int | None = None  # per-query pools of this size (pointers are positions in them); None: global

    def header(self) -> dict:
        """The journal header's `rules`; `pool_size` only with per-query pools (global headers are as before)."""
        header = {"shot_num": self.shot_num, "num_items": self.num_items}
        if self.pool_size is not None:
            header["pool_size"] = self.pool_size
        return header

    @classmethod
    def from_header(cls, rules: dict) -> RecordRules:
        pool_size = rules.get("pool_size")
        return cls(int(rules["shot_num"]), int(rules["num_items"]), None if pool_size is None else int(pool_size))

    def problems(self, query_idx: int, entry: object, stats: object) -> Iterator[str]:
        """Every way a journal line's entry and stats break the schema."""
        yield from entry_problems(query_idx, entry, self)
        yield from stats_problems(stats)

    @staticmethod
    def needs_retry(entry: dict, stats: dict) -> bool:
        return needs_retry(entry, stats)


def entry_problems(query_idx: int, entry: object, rules: RecordRules) -> Iterator[str]:
    """Every way `entry` breaks the record schema for query `query_idx` (nothing when it is valid)."""
    where = f"query {query_idx}"
    if not isinstance(entry, dict) or not isinstance(entry.get("pointer_candidates"), list):
        yield f"{where}: entry must be an object with a 'pointer_candidates' list"
        return
    yield from (f"{where}: {p}" for p in _query_problems(query_idx, entry.get("query")))
    pool_problems = list(_pool_problems(query_idx, entry, rules))
    yield from (f"{where}: {p}" for p in pool_problems)
    pool = entry[POOL_FIELD] if rules.pool_size is not None and not pool_problems else None
    if not entry["pointer_candidates"]:
        yield f"{where}: no candidates"
    seen: set[tuple] = set()
    for n, candidate in enumerate(entry["pointer_candidates"]):
        problems = _candidate_problems(query_idx, candidate, rules, pool)
        yield from (f"{where}, candidate {n}: {p}" for p in problems)
        pointer = tuple(candidate.get("pointer") or ()) if isinstance(candidate, dict) else ()
        if pointer in seen:
            yield f"{where}, candidate {n}: pointer {list(pointer)} appears twice"
        seen.add(pointer)


def stats_problems(stats: object) -> Iterator[str]:
    """Every way a journal line's `stats` object is malformed."""
    if not isinstance(stats, dict):
        yield "stats must be an object"
        return
    dropped = stats.get("duplicates_dropped", {})
    if not isinstance(dropped, dict) or not all(
        m in GEN_METHODS and isinstance(n, int) and not isinstance(n, bool) and n >= 0 for m, n in dropped.items()
    ):
        yield "stats.duplicates_dropped must map method names to counts"
    if "query_error" in stats and not (isinstance(stats["query_error"], str) and stats["query_error"]):
        yield "stats.query_error must be a non-empty string"


def _query_problems(query_idx: int, query: object) -> Iterator[str]:
    if not isinstance(query, dict):
        yield "missing the 'query' object"
        return
    for name, kind in QUERY_FIELDS.items():
        value = query.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            yield f"query.{name} missing or not {kind.__name__}"
    if query.get("query_id") != query_idx:
        yield f"query.query_id is {query.get('query_id')!r}"
    answers = query.get("gt_answers_raw")
    if isinstance(answers, list) and (not answers or not all(isinstance(a, str) for a in answers)):
        yield "query.gt_answers_raw must be a non-empty list of strings"


def old_pool_layout(entry: object) -> bool:
    """Whether a record holds its pool inside `query` (earlier versions), where the trainer never looks."""
    return isinstance(entry, dict) and isinstance(entry.get("query"), dict) and POOL_FIELD in entry["query"]


def _pool_problems(query_idx: int, entry: dict, rules: RecordRules) -> Iterator[str]:
    """The record's pool: beside `query` exactly with per-query pools, `pool_size` distinct rows without the query."""
    if old_pool_layout(entry):
        yield f"query.{POOL_FIELD}: the pool belongs beside 'query', where the lineage's trainer reads it"
    pool = entry.get(POOL_FIELD)
    if rules.pool_size is None:
        if POOL_FIELD in entry:
            yield f"{POOL_FIELD} in a record of a global-pool run"
        return
    if not isinstance(pool, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in pool):
        yield f"{POOL_FIELD} missing or not a list of integers"
        return
    if len(pool) != rules.pool_size:
        yield f"{POOL_FIELD} has {len(pool)} rows, expected pool_size = {rules.pool_size}"
    if any(not 0 <= r < rules.num_items for r in pool):
        yield f"{POOL_FIELD} has ids outside 0..{rules.num_items - 1}"
    if query_idx in pool:
        yield f"{POOL_FIELD} contains the query itself"
    if len(set(pool)) != len(pool):
        yield f"{POOL_FIELD} repeats a row"


def _candidate_problems(query_idx: int, c: object, rules: RecordRules, pool: list[int] | None) -> Iterator[str]:
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
        if value is not None and (not is_json_number(value) or not math.isfinite(value)):
            yield f"{name} must be a finite number or null"
    yield from _pointer_problems(query_idx, c["pointer"], rules)
    yield from _global_pointer_problems(c, rules, pool)
    yield from _method_problems(c)
    yield from _score_problems(c)
    yield from _dense_problems(c)


def _pointer_problems(query_idx: int, pointer: list, rules: RecordRules) -> Iterator[str]:
    """`pointer`: global rows, or with per-query pools positions in the pool (the query is not in it)."""
    limit = rules.num_items if rules.pool_size is None else rules.pool_size
    if len(pointer) != rules.shot_num:
        yield f"pointer {pointer} has {len(pointer)} ids, expected shot_num = {rules.shot_num}"
    if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < limit for i in pointer):
        yield f"pointer {pointer} has ids outside 0..{limit - 1}"
    if rules.pool_size is None and query_idx in pointer:
        yield f"pointer {pointer} contains the query itself"
    if len(set(map(repr, pointer))) != len(pointer):
        yield f"pointer {pointer} repeats an id"


def _global_pointer_problems(c: dict, rules: RecordRules, pool: list[int] | None) -> Iterator[str]:
    """`pointer_global` exists exactly with per-query pools and is the pool's rows at `pointer`."""
    if rules.pool_size is None:
        if GLOBAL_POINTER_FIELD in c:
            yield f"{GLOBAL_POINTER_FIELD} in a record of a global-pool run"
        return
    pointer, value = c["pointer"], c.get(GLOBAL_POINTER_FIELD)
    if not isinstance(value, list):
        yield f"{GLOBAL_POINTER_FIELD} missing or not a list"
    elif pool is not None and _in_pool(pointer, pool) and value != [pool[i] for i in pointer]:
        yield f"{GLOBAL_POINTER_FIELD} {value} is not {POOL_FIELD} at pointer {pointer}"


def _in_pool(pointer: list, pool: list[int]) -> bool:
    return all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(pool) for i in pointer)


def _method_problems(c: dict) -> Iterator[str]:
    method = c["gen_method"]
    if method not in GEN_METHODS:
        yield f"gen_method {method!r} is not one of {', '.join(GEN_METHODS)}"
    if method == "beam" and (not isinstance(c.get("beam_rank"), int) or isinstance(c.get("beam_rank"), bool)):
        yield "a beam candidate needs an integer beam_rank"
    if method == "sample" and not (is_json_number(c.get("temperature")) and c["temperature"] > 0):
        yield "a sample candidate needs a temperature > 0"


def _score_problems(c: dict) -> Iterator[str]:
    if c["vqa_eval_mode"] != EVAL_MODE_NAME:
        yield f"vqa_eval_mode must be {EVAL_MODE_NAME!r}, found {c['vqa_eval_mode']!r}"
    acc = c["vqa_acc_score"]
    if not any(abs(acc - v) < 1e-6 for v in ACCURACY_VALUES):
        yield f"vqa_acc_score {acc} is not one of {ACCURACY_VALUES}"
    if c["vqa_correct"] != (1 if acc > 0 else 0):
        yield f"vqa_correct {c['vqa_correct']} disagrees with vqa_acc_score {acc}"
    if c["eval_failed"]:
        if acc != 0:
            yield "a failed evaluation must score 0"
        if not isinstance(c.get("eval_error"), str) or not c["eval_error"]:
            yield "a failed evaluation needs its reason in eval_error"


def _dense_problems(c: dict) -> Iterator[str]:
    gt = c.get(GT_PROB_FIELD, "missing")
    if gt is not None and not (is_json_number(gt) and 0.0 <= gt <= 1.0):
        yield f"{GT_PROB_FIELD} must be a probability in [0, 1] or null, found {gt!r}"
    values = [c.get(name) for name in RELEVANCE_FIELDS]
    if not all(is_json_number(v) and 0.0 <= v <= 1.0 for v in values):
        yield f"{', '.join(RELEVANCE_FIELDS)} must be numbers in [0, 1]"
    elif abs(values[2] - max(values[0], values[1])) > 1e-12:
        yield "vqa_rel_score must be the larger of vqa_rel_token_f1 and vqa_rel_edit_sim"


# -- counting -------------------------------------------------------------------------------------


def method_of(candidate: dict) -> str:
    return candidate["gen_method"]


def method_label(candidate: dict) -> str:
    """`beam`, `random`, `retrieval`, or `sample@T`: the groups the run's settings count, and the
    metrics and plots compare."""
    if candidate["gen_method"] == "sample":
        return f"sample@{candidate['temperature']:g}"
    return candidate["gen_method"]


@dataclass
class MethodTotals:
    """Counts over records: candidates, failures, duplicates dropped, and per group of candidates (by
    default their method; `label` may group them otherwise) their number, mean accuracy and share
    correct. The final-JSON writer counts with it for the meta sidecar, and the validator counts the
    file with it again for its breakdowns and to check the sidecar's counts."""

    label: Callable[[dict], str] = method_of
    queries: int = 0
    candidates: int = 0
    failed: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    accuracy_sum: dict[str, float] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)

    def add(self, entry: dict, stats: dict | None = None) -> None:
        self.queries += 1
        for candidate in entry["pointer_candidates"]:
            group = self.label(candidate)
            self.candidates += 1
            self.failed += bool(candidate["eval_failed"])
            self.count[group] = self.count.get(group, 0) + 1
            self.accuracy_sum[group] = self.accuracy_sum.get(group, 0.0) + candidate["vqa_acc_score"]
            self.correct[group] = self.correct.get(group, 0) + candidate["vqa_correct"]
        for method, n in (stats or {}).get("duplicates_dropped", {}).items():
            self.duplicates[method] = self.duplicates.get(method, 0) + n

    def by_group(self) -> dict[str, dict]:
        """group -> {"candidates", "accuracy" (mean), "share_correct"}, sorted by group."""
        return {
            g: {"candidates": n, "accuracy": self.accuracy_sum[g] / n, "share_correct": self.correct[g] / n}
            for g, n in sorted(self.count.items())
        }

    def as_dict(self) -> dict:
        return {
            "queries": self.queries,
            "candidates": self.candidates,
            "failed": self.failed,
            "duplicates_dropped": dict(sorted(self.duplicates.items())),
            "by_method": self.by_group(),
        }
