"""The VQA reader: row order, the ICD answer rule, lazy images, and a clear error for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lever_lm.data.vqa import VQADataset, load_annotations, read_rgb_image
from lever_lm.demo.dataset import Split
from lever_lm.errors import InputError


def _load_demo(demo_dir: Path) -> VQADataset:
    split = Split("train", demo_dir / "vqa")
    return VQADataset.load(split.questions_path, split.annotations_path, split.image_root)


def _answer(text: str, i: int) -> dict:
    return {"answer": text, "answer_confidence": "yes", "answer_id": i + 1}


def _write_small_set(root: Path, with_subtype: bool = True, mc: bool = True) -> tuple[Path, Path, Path]:
    """Three questions on two images, written out of question_id order; 8x8 JPEGs under train2014."""
    questions = [
        {"image_id": 7, "question": "q30?", "question_id": 30},
        {"image_id": 5, "question": "q10?", "question_id": 10},
        {"image_id": 5, "question": "q20?", "question_id": 20},
    ]
    raw = {
        10: ["red", "blue", "blue", "red", "green"],  # tie red/blue: red is first
        20: ["two", "2", "2", "2"],
        30: ["yes"] * 10,
    }
    annotations = []
    for qid, answers in raw.items():
        record = {
            "question_id": qid,
            "image_id": 5 if qid < 30 else 7,
            "question_type": f"type{qid}",
            "answer_type": "other",
            "answers": [_answer(a, i) for i, a in enumerate(answers)],
        }
        if mc:
            record["multiple_choice_answer"] = f"mc{qid}"
        annotations.append(record)
    header = {"data_subtype": "train2014"} if with_subtype else {}
    q_path, a_path = root / "questions.json", root / "annotations.json"
    q_path.write_text(json.dumps({**header, "questions": questions}))
    a_path.write_text(json.dumps({"annotations": annotations}))
    image_root = root / "train2014"
    image_root.mkdir()
    for image_id in (5, 7):
        Image.new("RGB", (8, 8), (image_id * 30, 0, 0)).save(image_root / f"COCO_train2014_{image_id:012d}.jpg")
    return q_path, a_path, image_root


def test_demo_split_is_sorted_by_question_id_and_matches_the_files(demo_dir):
    dataset = _load_demo(demo_dir)
    split = Split("train", demo_dir / "vqa")
    questions = json.loads(split.questions_path.read_text())["questions"]
    annotations = {a["question_id"]: a for a in json.loads(split.annotations_path.read_text())["annotations"]}
    assert len(dataset) == len(questions) == 274
    expected = sorted(questions, key=lambda q: q["question_id"])
    for idx in (0, 1, 137, 273):
        item, record = dataset[idx], expected[idx]
        annotation = annotations[record["question_id"]]
        assert item.idx == idx
        assert (item.question_id, item.image_id, item.question) == (
            record["question_id"],
            record["image_id"],
            record["question"],
        )
        assert item.answers == tuple(a["answer"] for a in annotation["answers"]) and len(item.answers) == 10
        assert item.icd_answer == annotation["multiple_choice_answer"]
        assert (item.question_type, item.answer_type) == (annotation["question_type"], annotation["answer_type"])
        assert dataset.image_path(idx) == split.image_path(item.image_id)
    ids = [dataset[i].question_id for i in range(len(dataset))]
    assert ids == sorted(ids)
    with pytest.raises(IndexError):
        dataset[274]


def test_icd_answer_without_multiple_choice_is_the_most_frequent_raw_answer_ties_first(tmp_path):
    dataset = VQADataset.load(*_write_small_set(tmp_path, mc=False))
    assert [dataset[i].question_id for i in range(3)] == [10, 20, 30]
    assert [dataset[i].icd_answer for i in range(3)] == ["red", "2", "yes"]
    (tmp_path / "mc").mkdir()
    with_mc = VQADataset.load(*_write_small_set(tmp_path / "mc"))
    assert [with_mc[i].icd_answer for i in range(3)] == ["mc10", "mc20", "mc30"]


def test_image_prefix_from_data_subtype_else_from_the_image_root_name(tmp_path):
    q_path, a_path, image_root = _write_small_set(tmp_path, with_subtype=False)
    dataset = VQADataset.load(q_path, a_path, image_root)
    assert dataset.image_path(0) == image_root / "COCO_train2014_000000000005.jpg"
    assert read_rgb_image(dataset.image_path(2)).getpixel((0, 0))[0] > 150  # image 7 is the brighter one
    odd_root = tmp_path / "pictures"
    image_root.rename(odd_root)
    with pytest.raises(InputError, match="cannot tell the COCO image file prefix") as error:
        VQADataset.load(q_path, a_path, odd_root)
    assert error.value.path == str(q_path)


def test_missing_image_root(tmp_path):
    q_path, a_path, image_root = _write_small_set(tmp_path)
    with pytest.raises(InputError, match="image directory not found") as error:
        VQADataset.load(q_path, a_path, tmp_path / "train2014_missing")
    assert error.value.path == str(tmp_path / "train2014_missing")


def test_load_annotations_by_question_id(tmp_path):
    _, a_path, _ = _write_small_set(tmp_path)
    annotations = load_annotations(a_path)
    assert sorted(annotations) == [10, 20, 30] and annotations[20]["question_type"] == "type20"


def _rewrite(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, which, message",
    [
        ("missing questions file", "q", "file not found"),
        ("questions not JSON", "q", "not valid JSON"),
        ("annotations not JSON", "a", "not valid JSON"),
        ("questions is a list", "q", "expected a JSON object"),
        ("no questions key", "q", "missing the 'questions' list"),
        ("no annotations key", "a", "missing the 'annotations' list"),
        ("question without id", "q", "lacks an integer 'question_id'"),
        ("annotation missing for a question", "a", "no annotation for question_id 20"),
        ("duplicate question id", "q", "question_id 10 appears twice"),
        ("annotation without answers", "a", "question_id 30 has no 'answers' list"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, case, which, message):
    q_path, a_path, image_root = _write_small_set(tmp_path)
    if case == "missing questions file":
        q_path.unlink()
    elif case == "questions not JSON":
        q_path.write_text("{not json")
    elif case == "annotations not JSON":
        a_path.write_text("")
    elif case == "questions is a list":
        q_path.write_text("[]")
    elif case == "no questions key":
        q_path.write_text("{}")
    elif case == "no annotations key":
        a_path.write_text('{"questions": []}')
    elif case == "question without id":
        _rewrite(q_path, lambda d: d["questions"][0].pop("question_id"))
    elif case == "annotation missing for a question":
        _rewrite(a_path, lambda d: d["annotations"].pop(1))
    elif case == "duplicate question id":
        _rewrite(q_path, lambda d: d["questions"].append(dict(d["questions"][1])))
    elif case == "annotation without answers":
        _rewrite(a_path, lambda d: d["annotations"][2].pop("answers"))
    with pytest.raises(InputError, match=message) as error:
        VQADataset.load(q_path, a_path, image_root)
    assert error.value.path == str(q_path if which == "q" else a_path)


def test_missing_or_unreadable_image_names_the_file(tmp_path):
    dataset = VQADataset.load(*_write_small_set(tmp_path))
    missing = dataset.image_path(0)
    missing.unlink()
    with pytest.raises(InputError, match="image file not found") as error:
        read_rgb_image(dataset.image_path(0))
    assert error.value.path == str(missing)
    broken = dataset.image_path(2)
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="cannot read image") as error:
        read_rgb_image(dataset.image_path(2))
    assert error.value.path == str(broken)
