"""Parsed VQA files are cached by content: a later start reads compact columns, never a stale or damaged parse."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from lever_lm import digests
from lever_lm.data import parsed_cache, vqa
from lever_lm.data.columns import CodedTuples, ColumnError, TextColumn
from lever_lm.data.vqa import AnswerTable, VQADataset
from lever_lm.demo.dataset import Split
from lever_lm.errors import InputError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv(digests.CACHE_ENV, str(directory))
    monkeypatch.setattr(digests, "_CACHE", digests.DigestCache())
    monkeypatch.setattr(digests, "RECENT_SECONDS", 0.0)
    monkeypatch.setattr(parsed_cache, "_warned", set())
    return directory


@pytest.fixture
def demo_split(demo_dir: Path, tmp_path: Path) -> Split:
    """A private copy of the demo's training split (tests edit it)."""
    split = Split("train", tmp_path / "vqa")
    split.image_root.mkdir(parents=True)
    for source, target in (
        (Split("train", demo_dir / "vqa").questions_path, split.questions_path),
        (Split("train", demo_dir / "vqa").annotations_path, split.annotations_path),
    ):
        target.write_bytes(source.read_bytes())
    return split


def load(split: Split) -> VQADataset:
    return VQADataset.load(split.questions_path, split.annotations_path, split.image_root)


def items(dataset: VQADataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def no_json(monkeypatch) -> None:
    def refuse(path, *args, **kwargs):
        raise AssertionError(f"{path} was parsed again")

    monkeypatch.setattr(vqa, "read_json", refuse)


def test_a_second_load_reads_the_cached_columns_not_the_json(cache, demo_split, monkeypatch):
    first = load(demo_split)
    assert len(list((cache / parsed_cache.SUBDIR).glob("*.npz"))) == 1
    no_json(monkeypatch)
    second = load(demo_split)
    assert items(second) == items(first) and len(second) == 274
    assert second.questions == first.questions and second.image_ids == first.image_ids


def test_an_edited_file_is_parsed_again(cache, demo_split, monkeypatch):
    first = load(demo_split)
    data = json.loads(demo_split.annotations_path.read_text())
    data["annotations"][0]["answers"][0]["answer"] = "zebra"
    demo_split.annotations_path.write_text(json.dumps(data))
    edited = load(demo_split)
    question_id = data["annotations"][0]["question_id"]
    row = int(np.searchsorted(edited.columns.question_ids, question_id))
    assert edited[row].answers[0] == "zebra" != first[row].answers[0]
    assert len(list((cache / parsed_cache.SUBDIR).glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign arrays"])
def test_a_damaged_cache_file_is_parsed_again_with_one_warning(cache, demo_split, damage, caplog):
    expected = items(load(demo_split))
    (cached,) = (cache / parsed_cache.SUBDIR).glob("*.npz")
    if damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:5000])
    elif damage == "garbage":
        cached.write_bytes(b"\0" * 5000)
    else:  # valid arrays that do not fit together: an answer code outside the vocabulary
        with np.load(cached) as archive:
            arrays = {name: archive[name] for name in archive.files}
        arrays["answers.codes"] = arrays["answers.codes"].copy()
        arrays["answers.codes"][3] = 10**6
        with open(cached, "wb") as handle:
            np.savez(handle, **arrays)
    with caplog.at_level(logging.WARNING, logger="lever_lm.data.parsed_cache"):
        assert items(load(demo_split)) == expected
        assert items(load(demo_split)) == expected  # replaced: no second warning
    assert len(caplog.records) == 1 and "damaged" in caplog.text


def test_bad_files_still_name_the_file_and_the_problem(cache, demo_split):
    data = json.loads(demo_split.annotations_path.read_text())
    data["annotations"][5]["answers"] = []
    demo_split.annotations_path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="has no 'answers' list") as error:
        load(demo_split)
    assert error.value.path == str(demo_split.annotations_path)
    demo_split.questions_path.unlink()
    with pytest.raises(InputError, match="file not found"):
        load(demo_split)


def test_an_unwritable_cache_directory_only_costs_the_parse(tmp_path, demo_split, monkeypatch, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv(digests.CACHE_ENV, str(blocker))
    monkeypatch.setattr(digests, "_CACHE", digests.DigestCache())
    monkeypatch.setattr(parsed_cache, "_warned", set())
    with caplog.at_level(logging.WARNING):
        first, second = load(demo_split), load(demo_split)
    assert items(first) == items(second)
    assert len([r for r in caplog.records if r.name == "lever_lm.data.parsed_cache"]) == 1


def test_answer_table_by_question_id(cache, demo_split, monkeypatch):
    annotations = json.loads(demo_split.annotations_path.read_text())["annotations"]
    table = AnswerTable.load(demo_split.annotations_path)
    for record in annotations[:20]:
        assert table.get(record["question_id"]) == tuple(a["answer"] for a in record["answers"])
    assert table.get(-1) is None and table.get(10**12) is None
    no_json(monkeypatch)
    assert AnswerTable.load(demo_split.annotations_path).get(annotations[0]["question_id"]) is not None


def test_the_data_set_pickles_as_a_few_buffers(cache, demo_split):
    """What Ray's object store holds for the workers: columns, not an object per question."""
    dataset = load(demo_split)
    copy = pickle.loads(pickle.dumps(dataset, protocol=5))
    assert items(copy) == items(dataset)
    assert isinstance(dataset.columns.questions, TextColumn) and isinstance(dataset.columns.answers, CodedTuples)


def test_columns_refuse_arrays_that_do_not_fit():
    column = TextColumn.from_strings(["a", "bé", ""])
    assert column.tolist() == ["a", "bé", ""] and column[1] == "bé"
    arrays = column.arrays("q")
    assert TextColumn.from_arrays(arrays, "q", 3).tolist() == ["a", "bé", ""]
    with pytest.raises(ColumnError, match="rows, expected"):
        TextColumn.from_arrays(arrays, "q", 4)
    with pytest.raises(ColumnError, match="offsets"):
        TextColumn.from_arrays({**arrays, "q.offsets": np.array([0, 2, 1, 4])}, "q")
    with pytest.raises(ColumnError, match="UTF-8"):
        TextColumn.from_arrays({**arrays, "q.data": np.frombuffer(b"a\xff\xfe\x00", np.uint8)}, "q")
    with pytest.raises(ColumnError, match="missing"):
        TextColumn.from_arrays({"q.data": arrays["q.data"]}, "q")


def test_an_edited_parser_does_not_read_the_old_parse(cache, demo_split, tmp_path, monkeypatch):
    load(demo_split)
    edited = tmp_path / "vqa.py"
    edited.write_text(Path(vqa.__file__).read_text() + "\n# edited\n")
    monkeypatch.setattr(vqa, "__file__", str(edited))
    load(demo_split)
    assert len(list((cache / parsed_cache.SUBDIR).glob("*.npz"))) == 2
