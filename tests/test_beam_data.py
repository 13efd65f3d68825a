"""The beam data reader: query order, shot number, and a clear error for each bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lever_lm.data.beam_data import load_beam_data, save_beam_data
from lever_lm.errors import InputError

GOOD = {
    "7": {"id_list": [[3, 1, 7], [1, 3, 7]], "score_list": [0.5, 0.25], "beams": "ignored", "few_shot_num": 2},
    "2": {"id_list": [[9, 0, 2]], "score_list": [1], "shot_scores": [[0.1, 0.2]]},
}


def _write(tmp_path: Path, data, name: str = "beam.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_reads_queries_in_key_order_and_ignores_extra_keys(tmp_path):
    beam = load_beam_data(_write(tmp_path, GOOD), num_items=10)
    assert beam.query_ids == [7, 2]
    assert beam.shot_num == 2
    assert beam.id_lists == {7: [[3, 1, 7], [1, 3, 7]], 2: [[9, 0, 2]]}
    assert beam.icd_sequences(7) == [[3, 1], [1, 3]]


def test_save_then_load_round_trips(tmp_path):
    path = tmp_path / "sub" / "beam.json"
    save_beam_data(GOOD, path)
    assert json.loads(path.read_text()) == GOOD
    assert load_beam_data(path, num_items=10).query_ids == [7, 2]
    assert [p.name for p in path.parent.iterdir()] == ["beam.json"]  # no temporary file left


@pytest.mark.parametrize(
    "data, message",
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({}, "no queries"),
        ({"x7": GOOD["7"]}, "key 'x7' is not a query index"),
        ({"07": GOOD["7"]}, "key '07' is not a query index"),
        ({"12": {"id_list": [[3, 1, 12]], "score_list": [0.1]}}, "query index 12 is outside the data set"),
        ({"7": {"id_list": [[3, 10, 7]], "score_list": [0.1]}}, "query 7: id 10 is outside the data set"),
        ({"7": {"id_list": [[3, -1, 7]], "score_list": [0.1]}}, "query 7: id -1 is outside"),
        ({"7": {"id_list": [[3, 1, 2]], "score_list": [0.1]}}, r"\[3, 1, 2\] does not end with its query index 7"),
        ({"7": {"id_list": [[3, 1, 7], [3, 7]], "score_list": [0.1, 0.2]}}, "has 1 ICDs, earlier entries have 2"),
        ({"7": {"id_list": [[7]], "score_list": [0.1]}}, "holds no ICD"),
        ({"7": {"id_list": [[3, 1.0, 7]], "score_list": [0.1]}}, "id 1.0 is not an integer"),
        ({"7": {"id_list": [[3, 1, 7]], "score_list": [0.1, 0.2]}}, "1 id_list entries but 2 scores"),
        ({"7": {"id_list": [[3, 1, 7]]}}, "'score_list' must be a list of numbers"),
        ({"7": {"score_list": []}}, "'id_list' must be a non-empty list"),
        ({"7": [3, 1, 7]}, "expected an object with 'id_list'"),
        (
            '{"7": {"id_list": [[3, 1, 7]], "score_list": [0]}, "7": {"id_list": [[3, 1, 7]], "score_list": [0]}}',
            "key '7' appears twice",
        ),
    ],
)
def test_bad_beam_data_names_the_file_and_the_problem(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(InputError, match=message) as error:
        load_beam_data(path, num_items=10)
    assert error.value.path == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="beam data file not found"):
        load_beam_data(tmp_path / "nope.json", num_items=10)
