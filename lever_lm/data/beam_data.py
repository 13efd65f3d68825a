"""Beam data JSON from Lever-LM's data generation (docs/formats.md §3.2): queries, ICD sequences, scores.

`{"<query_idx>": {"id_list": [[icd_1, ..., icd_k, query_idx], ...], "score_list": [...], ...}}`.
The keys give the queries and their order; the last id of every sequence is the query itself;
`shot_num` is the sequence length minus one and must be the same everywhere. Every id is a row of
the training split, so it is checked against the data set size here, before any model runs --
a bad id would otherwise surface hours later as an IndexError deep inside a GPU job. Keys that
newer files add (`beams`, `few_shot_num`, `shot_scores`) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lever_lm.errors import InputError
from lever_lm.io import atomic_output, is_json_number, read_json


@dataclass
class BeamData:
    path: Path
    query_ids: list[int]  # keys in file order, as ints
    shot_num: int  # len(id_list entry) - 1
    id_lists: dict[int, list[list[int]]]  # query -> beams, each [icd_1, ..., icd_k, query]

    def icd_sequences(self, query_id: int) -> list[list[int]]:
        """The ICD ids of each beam of a query, in prompt order (the query id stripped)."""
        return [ids[:-1] for ids in self.id_lists[query_id]]


def load_beam_data(path: str | Path, num_items: int) -> BeamData:
    """Read and check a beam data file against a data set of `num_items` rows."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "beam data file not found")
    raw = read_json(path, unique_keys=True)
    if not raw:
        raise InputError(path, "no queries in the beam data")
    query_ids: list[int] = []
    id_lists: dict[int, list[list[int]]] = {}
    shot_num: int | None = None
    for key, entry in raw.items():
        query_id = _query_id(key, path, num_items)
        id_list = _entry(entry, key, path)
        for ids in id_list:
            _check_sequence(ids, query_id, key, path, num_items)
            if shot_num is None:
                shot_num = len(ids) - 1
            elif len(ids) - 1 != shot_num:
                raise InputError(
                    path, f"query {key}: id_list entry {ids} has {len(ids) - 1} ICDs, earlier entries have {shot_num}"
                )
        query_ids.append(query_id)
        id_lists[query_id] = id_list
    assert shot_num is not None
    return BeamData(path=path, query_ids=query_ids, shot_num=shot_num, id_lists=id_lists)


def save_beam_data(data: dict, path: str | Path) -> None:
    """Write a beam data dict (docs/formats.md §3.2) as JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")


def _query_id(key: str, path: Path, num_items: int) -> int:
    if not (key.isascii() and key.isdigit()) or str(int(key)) != key:
        raise InputError(path, f"key {key!r} is not a query index (a non-negative integer written plainly)")
    query_id = int(key)
    if query_id >= num_items:
        raise InputError(path, f"query index {query_id} is outside the data set (0..{num_items - 1})")
    return query_id


def _entry(entry: object, key: str, path: Path) -> list[list[int]]:
    """The query's id lists; its scores are checked (one number per beam) but not used here."""
    if not isinstance(entry, dict):
        raise InputError(path, f"query {key}: expected an object with 'id_list' and 'score_list'")
    id_list, score_list = entry.get("id_list"), entry.get("score_list")
    if not isinstance(id_list, list) or not id_list or not all(isinstance(ids, list) for ids in id_list):
        raise InputError(path, f"query {key}: 'id_list' must be a non-empty list of id lists")
    if not isinstance(score_list, list) or not all(is_json_number(s) for s in score_list):
        raise InputError(path, f"query {key}: 'score_list' must be a list of numbers")
    if len(score_list) != len(id_list):
        raise InputError(path, f"query {key}: {len(id_list)} id_list entries but {len(score_list)} scores")
    return id_list


def _check_sequence(ids: list, query_id: int, key: str, path: Path, num_items: int) -> None:
    if len(ids) < 2:
        raise InputError(path, f"query {key}: id_list entry {ids} holds no ICD (expected [icd_1, ..., icd_k, {key}])")
    for value in ids:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(path, f"query {key}: id {value!r} is not an integer")
        if not 0 <= value < num_items:
            raise InputError(path, f"query {key}: id {value} is outside the data set (0..{num_items - 1})")
    if ids[-1] != query_id:
        raise InputError(path, f"query {key}: id_list entry {ids} does not end with its query index {key}")
