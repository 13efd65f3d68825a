"""The VQA data set in the official format: questions + annotations + COCO images (docs/formats.md §3.1).

Row order is the id space of the whole project: items are sorted by `question_id` and item i has
`idx = i`; beam data keys, embedding rows and output pointers are all such rows of the training
split. The reader must scale to VQAv2 train (443,757 questions, 354 MB of annotations), so it
joins the two files once, keeps only what prompts and scoring read, in compact columns (one buffer
per field, `lever_lm.data.columns`; no object per item until one is asked for), and caches that
parse by the files' content (`lever_lm.data.parsed_cache`): a later start, shard or Ray worker
reads the columns instead of the JSON. It never decodes an image: it only names each item's image
file (`image_path`); `read_rgb_image` decodes one, for the backends' and the embedding export's
own caches.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lever_lm.data.columns import CodedTuples, ColumnError, TextColumn, Vocabulary, check_codes, int_array
from lever_lm.data.parsed_cache import cached_parse
from lever_lm.errors import InputError
from lever_lm.io import read_json

# A COCO split name as used in image file names: train2014, val2014, test2015, ...
_SUBTYPE_PATTERN = re.compile(r"^[a-z]+\d{4}$")


@dataclass(frozen=True)
class VQAItem:
    """One question of the data set, built on access from the column store."""

    idx: int  # row in the data set sorted by question_id
    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...]  # the raw human answers (10 in VQAv2 / OK-VQA)
    icd_answer: str  # the answer shown when this item is an ICD (docs/formats.md §3.1)
    answer_type: str | None
    question_type: str | None


class VQADataset:
    """Questions joined with their annotations, sorted by `question_id`; images named, not loaded."""

    def __init__(
        self,
        questions_path: Path,
        annotations_path: Path,
        image_root: Path,
        columns: VQAColumns,
        image_subtype: str,
    ):
        self.questions_path, self.annotations_path, self.image_root = questions_path, annotations_path, image_root
        self.image_subtype = image_subtype
        self.columns = columns

    @classmethod
    def load(
        cls,
        questions_path: str | Path,
        annotations_path: str | Path,
        image_root: str | Path,
    ) -> VQADataset:
        """Read and join both files (or their cached parse); fail on anything malformed before any
        image is touched."""
        questions_path, annotations_path, image_root = Path(questions_path), Path(annotations_path), Path(image_root)
        columns = cached_parse(
            "vqa-dataset",
            [questions_path, annotations_path],
            lambda: _parse_dataset(questions_path, annotations_path),
            VQAColumns.from_arrays,
            code=Path(__file__),
        )
        subtype = _image_subtype(columns.data_subtype, questions_path, image_root)
        if not image_root.is_dir():
            raise InputError(image_root, "image directory not found")
        return cls(questions_path, annotations_path, image_root, columns, subtype)

    def __len__(self) -> int:
        return len(self.columns.question_ids)

    def __getitem__(self, idx: int) -> VQAItem:
        if not 0 <= idx < len(self):
            raise IndexError(f"row {idx} outside the data set of {len(self)} items")
        c = self.columns
        return VQAItem(
            idx=idx,
            question_id=int(c.question_ids[idx]),
            image_id=int(c.image_ids[idx]),
            question=c.questions[idx],
            answers=c.answers[idx],
            icd_answer=c.answers.vocabulary[c.icd_answers[idx]],
            answer_type=c.type_name(c.answer_types[idx]),
            question_type=c.type_name(c.question_types[idx]),
        )

    @property
    def questions(self) -> list[str]:
        """All question texts in row order (a new list; for batch work such as embedding)."""
        return self.columns.questions.tolist()

    @property
    def image_ids(self) -> list[int]:
        """All image ids in row order (a new list)."""
        return self.columns.image_ids.tolist()

    def image_path(self, idx: int) -> Path:
        return self.image_path_of_image_id(int(self.columns.image_ids[idx]))

    def image_path_of_image_id(self, image_id: int) -> Path:
        return self.image_root / self.image_name(image_id)

    def image_name(self, image_id: int) -> str:
        return f"COCO_{self.image_subtype}_{image_id:012d}.jpg"

    def image_names(self) -> list[str]:
        """The file name (under `image_root`) of every image the data set shows, each once, sorted."""
        return sorted(self.image_name(i) for i in np.unique(self.columns.image_ids).tolist())


@dataclass(frozen=True)
class VQAColumns:
    """The joined data set, one compact column per field (`lever_lm.data.columns`), rows sorted by
    question_id: what the prompts (question, image, ICD answer) and the scoring (human answers) read."""

    question_ids: np.ndarray  # int64 [n], strictly increasing
    image_ids: np.ndarray  # int64 [n]
    questions: TextColumn
    answers: CodedTuples  # the raw human answers of each row
    icd_answers: np.ndarray  # int32 [n], codes into answers.vocabulary
    answer_types: np.ndarray  # int32 [n], codes into type_names (-1: none)
    question_types: np.ndarray  # int32 [n], codes into type_names (-1: none)
    type_names: list[str]
    data_subtype: str | None  # the questions file's `data_subtype`

    def type_name(self, code) -> str | None:
        return self.type_names[code] if code >= 0 else None

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "question_ids": self.question_ids,
            "image_ids": self.image_ids,
            **self.questions.arrays("questions"),
            **self.answers.arrays("answers"),
            "icd_answers": self.icd_answers,
            "answer_types": self.answer_types,
            "question_types": self.question_types,
            **TextColumn.from_strings(self.type_names).arrays("type_names"),
            "data_subtype": np.array([self.data_subtype or ""]),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> VQAColumns:
        """The columns of `arrays`, every one checked (ColumnError when they do not fit together)."""
        question_ids = int_array(arrays, "question_ids", np.int64)
        n = len(question_ids)
        if n and np.any(np.diff(question_ids) <= 0):
            raise ColumnError("question_ids are not strictly increasing")
        answers = CodedTuples.from_arrays(arrays, "answers", n)
        type_names = TextColumn.from_arrays(arrays, "type_names").tolist()
        subtype = arrays.get("data_subtype")
        if subtype is None or subtype.shape != (1,) or subtype.dtype.kind != "U":
            raise ColumnError("data_subtype: missing, or not one string")
        return cls(
            question_ids=question_ids,
            image_ids=int_array(arrays, "image_ids", np.int64, n),
            questions=TextColumn.from_arrays(arrays, "questions", n),
            answers=answers,
            icd_answers=check_codes(int_array(arrays, "icd_answers", np.int32, n), len(answers.vocabulary), "icd"),
            answer_types=check_codes(int_array(arrays, "answer_types", np.int32, n), len(type_names), "types", True),
            question_types=check_codes(
                int_array(arrays, "question_types", np.int32, n), len(type_names), "types", True
            ),
            type_names=type_names,
            data_subtype=str(subtype[0]) or None,
        )


@dataclass(frozen=True)
class AnswerTable:
    """question_id -> the raw human answers of an annotations file, for scoring queries: compact
    columns, cached by the file's content like the data set's (`lever_lm.data.parsed_cache`)."""

    question_ids: np.ndarray  # int64, strictly increasing
    answers: CodedTuples

    @classmethod
    def load(cls, path: str | Path) -> AnswerTable:
        path = Path(path)
        return cached_parse("vqa-answers", [path], lambda: _parse_answers(path), cls.from_arrays, code=Path(__file__))

    def get(self, question_id: int) -> tuple[str, ...] | None:
        row = int(np.searchsorted(self.question_ids, question_id))
        if row < len(self.question_ids) and self.question_ids[row] == question_id:
            return self.answers[row]
        return None

    def arrays(self) -> dict[str, np.ndarray]:
        return {"question_ids": self.question_ids, **self.answers.arrays("answers")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> AnswerTable:
        question_ids = int_array(arrays, "question_ids", np.int64)
        if len(question_ids) and np.any(np.diff(question_ids) <= 0):
            raise ColumnError("question_ids are not strictly increasing")
        return cls(question_ids, CodedTuples.from_arrays(arrays, "answers", len(question_ids)))


def _parse_answers(path: Path) -> dict[str, np.ndarray]:
    annotations = load_annotations(path)
    vocabulary, codes, offsets = Vocabulary(), array("i"), array("q", [0])
    question_ids = sorted(annotations)
    for question_id in question_ids:
        codes.extend(vocabulary.code(a) for a in _raw_answers(annotations[question_id], question_id, path))
        offsets.append(len(codes))
    answers = CodedTuples(vocabulary.strings, np.frombuffer(codes, np.int32), np.frombuffer(offsets, np.int64))
    return AnswerTable(np.array(question_ids, dtype=np.int64), answers).arrays()


def read_rgb_image(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file fully (so a truncated file fails here, not later) as RGB.

    With `max_pixels`, a larger image is decoded into that many pixels at most before it is
    converted: a JPEG by its decoder's own scaling (1/2 .. 1/8, never holding the full size), any
    other image by an integer box reduction right after decoding, one such image at a time (so that
    threads reading several never hold several full-size pictures). An image within the cap is
    decoded exactly as without one.
    """
    try:
        with Image.open(path) as image:
            if max_pixels is None or image.width * image.height <= max_pixels:
                return image.convert("RGB")
            with _LARGE_DECODE:
                reduced = _decoded_within(image, max_pixels)
                return reduced if reduced.mode == "RGB" and reduced is not image else reduced.convert("RGB")
    except FileNotFoundError:
        raise InputError(path, "image file not found (check the image root)") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise InputError(path, f"cannot read image: {error}") from None


_LARGE_DECODE = threading.Lock()
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBa", "I", "F", "CMYK")


def _decoded_within(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` decoded at a size of at most `max_pixels`, aspect ratio kept (within a pixel)."""
    factor = _reduction(image.width, image.height, max_pixels)
    image.draft("RGB", (-(-image.width // factor), -(-image.height // factor)))  # JPEG only; a no-op otherwise
    image.load()
    factor = _reduction(image.width, image.height, max_pixels)
    if factor == 1:
        return image
    if image.mode not in _REDUCIBLE_MODES:
        image = image.convert("RGB")
    return image.reduce(factor)


def _reduction(width: int, height: int, max_pixels: int) -> int:
    """The smallest integer factor that brings width x height (each rounded up) within `max_pixels`."""
    factor = 1
    while -(-width // factor) * -(-height // factor) > max_pixels:
        factor += 1
    return factor


def load_annotations(path: str | Path) -> dict[int, dict]:
    """question_id -> annotation record of an official annotations file (for scoring queries)."""
    path = Path(path)
    records = _records(read_json(path), "annotations", path)
    by_question: dict[int, dict] = {}
    for record in records:
        question_id = _int_field(record, "question_id", path)
        if question_id in by_question:
            raise InputError(path, f"question_id {question_id} is annotated twice")
        by_question[question_id] = record
    return by_question


def icd_answer(annotation: dict, raw_answers: tuple[str, ...]) -> str:
    """`multiple_choice_answer` when present, else the most frequent raw answer (ties: first)."""
    chosen = annotation.get("multiple_choice_answer")
    if isinstance(chosen, str):
        return chosen
    counts = Counter(raw_answers)
    return max(counts, key=counts.__getitem__)  # Counter keeps first-seen order; max keeps the first tie


def _records(data: dict, key: str, path: Path) -> list[dict]:
    records = data.get(key)
    if not isinstance(records, list):
        raise InputError(path, f"missing the '{key}' list (is this an official VQA {key} file?)")
    for record in records:
        if not isinstance(record, dict):
            raise InputError(path, f"every entry of '{key}' must be an object, found {type(record).__name__}")
    return records


def _int_field(record: dict, key: str, path: Path) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        where = f" (question_id {record['question_id']})" if key != "question_id" and "question_id" in record else ""
        raise InputError(path, f"entry{where} lacks an integer '{key}': {str(record)[:200]}")
    return value


def _image_subtype(data_subtype: str | None, questions_path: Path, image_root: Path) -> str:
    """The `<split>` of COCO file names: `data_subtype` of the questions file, else the root's name."""
    if data_subtype:
        return data_subtype
    if _SUBTYPE_PATTERN.match(image_root.name):
        return image_root.name
    raise InputError(
        questions_path,
        f"cannot tell the COCO image file prefix: no 'data_subtype' in the questions file and the image root "
        f"'{image_root}' is not named like a split (e.g. .../train2014)",
    )


def _parse_dataset(questions_path: Path, annotations_path: Path) -> dict[str, np.ndarray]:
    """Both files parsed and joined into columns (as arrays, for the parsed-input cache)."""
    questions_file = read_json(questions_path)
    records = _records(questions_file, "questions", questions_path)
    subtype = questions_file.get("data_subtype")
    subtype = subtype if isinstance(subtype, str) else None
    annotations = load_annotations(annotations_path)
    return _join_columns(records, questions_path, annotations, annotations_path, subtype).arrays()


def _join_columns(
    questions: list[dict],
    questions_path: Path,
    annotations: dict[int, dict],
    annotations_path: Path,
    data_subtype: str | None,
) -> VQAColumns:
    """One column per field, rows sorted by question_id; every question must have its annotation.
    Only what scoring and prompts read is kept; the answers are codes into one vocabulary."""
    keyed = []
    for record in questions:
        question_id = _int_field(record, "question_id", questions_path)
        image_id = _int_field(record, "image_id", questions_path)
        question = record.get("question")
        if not isinstance(question, str):
            raise InputError(questions_path, f"question_id {question_id} has no 'question' text")
        keyed.append((question_id, image_id, question))
    keyed.sort(key=lambda row: row[0])
    vocabulary, types = Vocabulary(), Vocabulary()
    codes, offsets = array("i"), array("q", [0])
    icd_answers, answer_types, question_types = array("i"), array("i"), array("i")
    previous = None
    for question_id, _, _ in keyed:
        if question_id == previous:
            raise InputError(questions_path, f"question_id {question_id} appears twice")
        previous = question_id
        annotation = annotations.get(question_id)
        if annotation is None:
            raise InputError(annotations_path, f"no annotation for question_id {question_id}")
        answers = _raw_answers(annotation, question_id, annotations_path)
        codes.extend(vocabulary.code(answer) for answer in answers)
        offsets.append(len(codes))
        icd_answers.append(vocabulary.code(icd_answer(annotation, answers)))
        answer_types.append(_type_code(annotation.get("answer_type"), types))
        question_types.append(_type_code(annotation.get("question_type"), types))
    return VQAColumns(
        question_ids=np.array([row[0] for row in keyed], dtype=np.int64),
        image_ids=np.array([row[1] for row in keyed], dtype=np.int64),
        questions=TextColumn.from_strings(row[2] for row in keyed),
        answers=CodedTuples(vocabulary.strings, np.frombuffer(codes, np.int32), np.frombuffer(offsets, np.int64)),
        icd_answers=np.frombuffer(icd_answers, np.int32),
        answer_types=np.frombuffer(answer_types, np.int32),
        question_types=np.frombuffer(question_types, np.int32),
        type_names=types.strings,
        data_subtype=data_subtype,
    )


def _type_code(value: object, types: Vocabulary) -> int:
    return types.code(value) if isinstance(value, str) else -1


def _raw_answers(annotation: dict, question_id: int, path: Path) -> tuple[str, ...]:
    """The raw answer texts."""
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not answers:
        raise InputError(path, f"question_id {question_id} has no 'answers' list")
    try:
        texts = tuple(answer["answer"] for answer in answers)
    except (TypeError, KeyError):
        texts = None
    if texts is None or not all(isinstance(text, str) for text in texts):
        bad = next(a for a in answers if not (isinstance(a, dict) and isinstance(a.get("answer"), str)))
        raise InputError(path, f"question_id {question_id} has an answer without 'answer' text: {bad!r}")
    return texts
