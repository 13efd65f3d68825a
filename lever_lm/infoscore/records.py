"""The beam data record: how a query's search result becomes its entry, and the schema every journal
line of a beam-data run is checked against.

A query's entry (one value of the beam JSON, docs/formats.md §3.2; one journal line's `entry`):

    {"id_list": [[icd_1, ..., icd_k, query], ...],   # best beam first, ICDs in prompt order
     "score_list": [...],                              # each beam's InfoScore of its last step
     "shot_scores": [[gain_1, ..., gain_k], ...]}      # each beam's InfoScore per step, in pick order

`id_list` and `score_list` are the lineage's (its SFT trainer reads them: a beam whose
`score_list` value is below its threshold, 0.0, is dropped); `shot_scores` is the key the
lineage's later files add for the per-step scores (ignored by the readers that do not know it).
The last step's score is the lineage's meaning of `score_list` whatever the ranking; the summed
gain of a beam is the sum of its `shot_scores`.

The journal line's `stats`: `prompts` scored, `failed_prompts` among them (`first_failure` says
why), `answer` (the y scored), and `query_error` when the query's prompt without ICDs failed, or
every sequence's -- then the entry is empty, the query is left out of the file, and a later run
retries it, as it retries a query with failed prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from lever_lm.infoscore.search import SearchResult
from lever_lm.io import is_json_number


def beam_entry(query: int, result: SearchResult) -> dict:
    """The query's beam data entry (empty lists when the search kept nothing)."""
    return {
        "id_list": [[*beam.icds, query] for beam in result.beams],
        "score_list": [beam.gains[-1] for beam in result.beams],
        "shot_scores": [list(beam.gains) for beam in result.beams],
    }


def beam_stats(result: SearchResult, answer: str, first_failure: str | None) -> dict:
    stats = {"prompts": result.prompts, "failed_prompts": result.failed, "answer": answer}
    if first_failure is not None:
        stats["first_failure"] = first_failure
    if result.base_probability is None:
        stats["query_error"] = f"the query's prompt without ICDs failed: {first_failure}"
    elif not result.beams:
        stats["query_error"] = f"no sequence of its pool could be scored: {first_failure}"
    return stats


@dataclass(frozen=True)
class BeamRules:
    """What a beam data entry must look like (the journal checks every line it reads with these)."""

    shot_num: int
    num_items: int  # rows of the training split: every id lies in 0..num_items-1
    beam_size: int
    JOB = "infoscore_beam"

    def header(self) -> dict:
        return {"job": self.JOB, "shot_num": self.shot_num, "num_items": self.num_items, "beam_size": self.beam_size}

    @classmethod
    def from_header(cls, rules: dict) -> BeamRules:
        return cls(int(rules["shot_num"]), int(rules["num_items"]), int(rules["beam_size"]))

    def needs_retry(self, entry: dict, stats: dict) -> bool:
        """A query whose own prompt failed, or that lost prompts to failures, is searched again later."""
        return bool(stats.get("query_error")) or stats.get("failed_prompts", 0) > 0

    def problems(self, query_idx: int, entry: object, stats: object) -> Iterator[str]:
        """Every way a journal line's entry and stats break the schema."""
        where = f"query {query_idx}"
        yield from (f"{where}: {p}" for p in self._stats_problems(stats))
        if not isinstance(entry, dict) or set(entry) != {"id_list", "score_list", "shot_scores"}:
            yield f"{where}: entry must be an object with exactly 'id_list', 'score_list' and 'shot_scores'"
            return
        ids, scores, shots = entry["id_list"], entry["score_list"], entry["shot_scores"]
        if not all(isinstance(x, list) for x in (ids, scores, shots)) or not len(ids) == len(scores) == len(shots):
            yield f"{where}: 'id_list', 'score_list' and 'shot_scores' must be lists of one length"
            return
        failed = isinstance(stats, dict) and bool(stats.get("query_error"))
        if not failed and not 1 <= len(ids) <= self.beam_size:
            yield f"{where}: {len(ids)} beams, expected 1..{self.beam_size}"
        seen: set[tuple] = set()
        for n, (sequence, score, gains) in enumerate(zip(ids, scores, shots)):
            yield from (f"{where}, beam {n}: {p}" for p in self._beam_problems(query_idx, sequence, score, gains))
            key = tuple(sequence) if isinstance(sequence, list) else ()
            if key in seen:
                yield f"{where}, beam {n}: the sequence {sequence} appears twice"
            seen.add(key)

    def _beam_problems(self, query_idx: int, sequence: object, score: object, gains: object) -> Iterator[str]:
        if not isinstance(sequence, list) or len(sequence) != self.shot_num + 1:
            yield f"id_list entry must hold {self.shot_num} ICDs and the query"
            return
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_items for i in sequence):
            yield f"ids must be rows 0..{self.num_items - 1}, found {sequence}"
        if sequence[-1] != query_idx:
            yield f"the last id must be the query {query_idx}, found {sequence[-1]}"
        if query_idx in sequence[:-1]:
            yield "contains the query itself as an ICD"
        if len(set(sequence[:-1])) != self.shot_num:
            yield f"repeats an ICD: {sequence}"
        if not isinstance(gains, list) or len(gains) != self.shot_num or not all(_finite(g) for g in gains):
            yield f"shot_scores entry must hold {self.shot_num} finite numbers"
        elif not _finite(score) or score != gains[-1]:
            yield "score_list entry must be the last step's InfoScore (the last of its shot_scores)"

    @staticmethod
    def _stats_problems(stats: object) -> Iterator[str]:
        if not isinstance(stats, dict):
            yield "stats must be an object"
            return
        for name in ("prompts", "failed_prompts"):
            value = stats.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                yield f"stats.{name} must be a non-negative integer"
        for name in ("answer", "first_failure", "query_error"):
            if name in stats and not isinstance(stats[name], str):
                yield f"stats.{name} must be a string"


def _finite(value: object) -> bool:
    return is_json_number(value) and math.isfinite(value)


@dataclass
class BeamTotals:
    """What a beam data file holds, for the log and the meta sidecar (`job.Totals`)."""

    queries: int = 0
    beams: int = 0
    kept_by_threshold: int = 0  # beams whose score_list value is >= 0.0: what the lineage's SFT keeps
    prompts: int = 0
    failed_prompts: int = 0

    def add(self, entry: dict, stats: dict | None = None) -> None:
        self.queries += 1
        self.beams += len(entry["id_list"])
        self.kept_by_threshold += sum(1 for score in entry["score_list"] if score >= 0.0)
        self.prompts += (stats or {}).get("prompts", 0)
        self.failed_prompts += (stats or {}).get("failed_prompts", 0)

    def as_dict(self) -> dict:
        return {
            "queries": self.queries,
            "beams": self.beams,
            "beams_kept_by_sft_threshold": self.kept_by_threshold,
            "prompts": self.prompts,
            "failed_prompts": self.failed_prompts,
        }


def describe_beam_data(final: dict, seconds: float) -> str:
    return (
        f"wrote {final['queries']} queries, {final['beams']} beams ({final['beams_kept_by_sft_threshold']} with a "
        f"last-step InfoScore >= 0, which the lineage's SFT keeps; {final['prompts']} prompts scored, "
        f"{final['failed_prompts']} failed) in {seconds:.1f}s"
    )
