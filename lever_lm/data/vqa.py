"""The VQA data set in the official format: questions + annotations + COCO images (docs/formats.md §3.1).

Row order is the id space of the whole project: items are sorted by `question_id` and item i has
`idx = i`; beam data keys, embedding rows and output pointers are all such rows of the training
split. The reader must scale to VQAv2 train (443,757 questions), so it keeps one Python list per
field (no object per item until one is asked for) and never decodes an image: it only names each
item's image file (`image_path`); `read_rgb_image` decodes one, for the backends' and the
embedding export's own caches.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

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
        columns: dict[str, list],
        image_subtype: str,
    ):
        self.questions_path, self.annotations_path, self.image_root = questions_path, annotations_path, image_root
        self.image_subtype = image_subtype
        self._question_ids: list[int] = columns["question_id"]
        self._image_ids: list[int] = columns["image_id"]
        self._questions: list[str] = columns["question"]
        self._answers: list[tuple[str, ...]] = columns["answers"]
        self._icd_answers: list[str] = columns["icd_answer"]
        self._answer_types: list[str | None] = columns["answer_type"]
        self._question_types: list[str | None] = columns["question_type"]

    @classmethod
    def load(
        cls,
        questions_path: str | Path,
        annotations_path: str | Path,
        image_root: str | Path,
    ) -> VQADataset:
        """Read and join both files; fail on anything malformed before any image is touched."""
        questions_path, annotations_path, image_root = Path(questions_path), Path(annotations_path), Path(image_root)
        questions_file = read_json(questions_path)
        questions = _records(questions_file, "questions", questions_path)
        annotations = load_annotations(annotations_path)
        subtype = _image_subtype(questions_file, questions_path, image_root)
        if not image_root.is_dir():
            raise InputError(image_root, "image directory not found")
        columns = _join_columns(questions, questions_path, annotations, annotations_path)
        return cls(questions_path, annotations_path, image_root, columns, subtype)

    def __len__(self) -> int:
        return len(self._question_ids)

    def __getitem__(self, idx: int) -> VQAItem:
        if not 0 <= idx < len(self):
            raise IndexError(f"row {idx} outside the data set of {len(self)} items")
        return VQAItem(
            idx=idx,
            question_id=self._question_ids[idx],
            image_id=self._image_ids[idx],
            question=self._questions[idx],
            answers=self._answers[idx],
            icd_answer=self._icd_answers[idx],
            answer_type=self._answer_types[idx],
            question_type=self._question_types[idx],
        )

    @property
    def questions(self) -> list[str]:
        """All question texts in row order (read-only view; for batch work such as embedding)."""
        return self._questions

    @property
    def image_ids(self) -> list[int]:
        """All image ids in row order (read-only view)."""
        return self._image_ids

    def image_path(self, idx: int) -> Path:
        return self.image_path_of_image_id(self._image_ids[idx])

    def image_path_of_image_id(self, image_id: int) -> Path:
        return self.image_root / f"COCO_{self.image_subtype}_{image_id:012d}.jpg"


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


def _image_subtype(questions_file: dict, questions_path: Path, image_root: Path) -> str:
    """The `<split>` of COCO file names: `data_subtype` of the questions file, else the root's name."""
    subtype = questions_file.get("data_subtype")
    if isinstance(subtype, str) and subtype:
        return subtype
    if _SUBTYPE_PATTERN.match(image_root.name):
        return image_root.name
    raise InputError(
        questions_path,
        f"cannot tell the COCO image file prefix: no 'data_subtype' in the questions file and the image root "
        f"'{image_root}' is not named like a split (e.g. .../train2014)",
    )


def _join_columns(questions: list[dict], questions_path: Path, annotations: dict[int, dict], annotations_path: Path):
    """One list per field, rows sorted by question_id; every question must have its annotation."""
    keyed = []
    for record in questions:
        question_id = _int_field(record, "question_id", questions_path)
        image_id = _int_field(record, "image_id", questions_path)
        question = record.get("question")
        if not isinstance(question, str):
            raise InputError(questions_path, f"question_id {question_id} has no 'question' text")
        keyed.append((question_id, image_id, question))
    keyed.sort(key=lambda row: row[0])
    columns: dict[str, list] = {name: [] for name in VQAItem.__dataclass_fields__ if name != "idx"}
    previous = None
    for question_id, image_id, question in keyed:
        if question_id == previous:
            raise InputError(questions_path, f"question_id {question_id} appears twice")
        previous = question_id
        annotation = annotations.get(question_id)
        if annotation is None:
            raise InputError(annotations_path, f"no annotation for question_id {question_id}")
        answers = _raw_answers(annotation, question_id, annotations_path)
        columns["question_id"].append(question_id)
        columns["image_id"].append(image_id)
        columns["question"].append(question)
        columns["answers"].append(answers)
        columns["icd_answer"].append(icd_answer(annotation, answers))
        columns["answer_type"].append(_interned(annotation.get("answer_type")))
        columns["question_type"].append(_interned(annotation.get("question_type")))
    return columns


def _interned(value: object) -> str | None:
    return sys.intern(value) if isinstance(value, str) else None


def _raw_answers(annotation: dict, question_id: int, path: Path) -> tuple[str, ...]:
    """The raw answer texts, interned: VQAv2 answers repeat a lot ("yes", "2"), one copy each is enough."""
    answers = annotation.get("answers")
    if not isinstance(answers, list) or not answers:
        raise InputError(path, f"question_id {question_id} has no 'answers' list")
    try:
        return tuple(sys.intern(answer["answer"]) for answer in answers)
    except (TypeError, KeyError):
        bad = next(a for a in answers if not (isinstance(a, dict) and isinstance(a.get("answer"), str)))
        raise InputError(path, f"question_id {question_id} has an answer without 'answer' text: {bad!r}") from None
