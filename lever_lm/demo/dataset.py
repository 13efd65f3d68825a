"""The demo VQA data set: synthetic pictures of coloured shapes, in the official VQA format.

Each picture shows one to four shapes of one kind and one colour on a plain background, so every
question has an answer that can be read off the image: the colour, the shape, the count, or the
side the shapes sit on. Ten simulated annotators answer each question the way real VQA annotators
do: mostly agreeing, sometimes writing "two" for "2", adding an article or a full stop, and on some
questions only three of ten agreeing. Files follow docs/formats.md §3.1 (COCO file names, official JSON keys),
so the demo goes through exactly the readers that load OK-VQA and VQAv2.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUNDS = {"white": (245, 245, 245), "grey": (200, 200, 200), "black": (20, 20, 20)}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# Plausible wrong answers an annotator may give, per question kind.
CONFUSIONS = {
    "red": ["orange", "pink"],
    "green": ["dark green", "teal"],
    "blue": ["purple", "navy"],
    "yellow": ["gold", "orange"],
    "purple": ["blue", "violet"],
    "orange": ["red", "yellow"],
    "circle": ["ball", "oval", "dot"],
    "square": ["box", "rectangle", "block"],
    "triangle": ["pyramid", "arrow", "cone"],
    "left": ["right", "middle"],
    "right": ["left", "middle"],
}


@dataclass(frozen=True)
class Scene:
    """What a picture shows; every answer is a function of it."""

    image_id: int
    shape: str
    colour: str
    count: int
    side: str
    background: str


@dataclass(frozen=True)
class Split:
    """Where one split's files live, named as the official OK-VQA / VQAv2 files are."""

    name: str  # "train" or "val"
    root: Path

    @property
    def questions_path(self) -> Path:
        return self.root / f"OpenEnded_mscoco_{self.name}2014_questions.json"

    @property
    def annotations_path(self) -> Path:
        return self.root / f"mscoco_{self.name}2014_annotations.json"

    @property
    def image_root(self) -> Path:
        return self.root / "mscoco2014" / f"{self.name}2014"

    def image_path(self, image_id: int) -> Path:
        return self.image_root / f"COCO_{self.name}2014_{image_id:012d}.jpg"


def build_demo_dataset(root: Path, seed: int = 0, num_train_images: int = 200, num_val_images: int = 150) -> dict:
    """Write the train and val splits under `root`; return a summary (counts per split).

    Each split draws from its own random stream, so the validation split's size never changes
    the training split (nor the models and beam data made from it); image ids never repeat
    across the splits. The layout matches the `okvqa_local` preset with OKVQA_PATH=COCO_PATH=root.
    """
    train_rng, val_rng = random.Random(seed), random.Random(f"{seed}:val")
    train_ids = train_rng.sample(range(1, 600_000), num_train_images)
    taken = set(train_ids)
    val_ids = [i for i in val_rng.sample(range(1, 600_000), num_val_images + len(taken)) if i not in taken]
    summary = {}
    for split, ids, rng in (
        (Split("train", root), train_ids, train_rng),
        (Split("val", root), val_ids[:num_val_images], val_rng),
    ):
        scenes = [random_scene(rng, image_id) for image_id in ids]
        summary[split.name] = write_split(split, scenes, rng)
    return summary


def random_scene(rng: random.Random, image_id: int) -> Scene:
    return Scene(
        image_id=image_id,
        shape=rng.choice(SHAPES),
        colour=rng.choice(sorted(COLOURS)),
        count=rng.randint(1, 4),
        side=rng.choice(("left", "right")),
        background=rng.choice(sorted(BACKGROUNDS)),
    )


def write_split(split: Split, scenes: list[Scene], rng: random.Random) -> dict:
    """Render the images and write the questions and annotations files of one split."""
    split.image_root.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for scene in scenes:
        render_scene(scene).save(split.image_path(scene.image_id), format="JPEG", quality=90)
        kinds = rng.sample(QUESTION_KINDS, rng.choice((1, 1, 2)))
        for k, kind in enumerate(kinds):
            question_id = scene.image_id * 10 + k
            question, answer, question_type, answer_type = kind(scene)
            answers = annotator_answers(rng, answer, answer_type)
            questions.append({"image_id": scene.image_id, "question": question, "question_id": question_id})
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": scene.image_id,
                    "question_type": question_type,
                    "answer_type": answer_type,
                    "answers": [
                        {"answer": a, "answer_confidence": rng.choice(("yes", "yes", "maybe")), "answer_id": i + 1}
                        for i, a in enumerate(answers)
                    ],
                    "multiple_choice_answer": most_common(answers),
                }
            )
    header = {
        "info": {"description": "Lever-LM demo VQA set"},
        "license": {"name": "CC0"},
        "data_subtype": f"{split.name}2014",
    }
    _write_json(
        split.questions_path, {**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}
    )
    _write_json(split.annotations_path, {**header, "annotations": annotations})
    return {"images": len(scenes), "questions": len(questions)}


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene: `count` shapes in a column band on `side` of the picture."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    size = 12
    x0 = 6 if scene.side == "left" else IMAGE_SIZE - 6 - 2 * size - 2
    for i in range(scene.count):
        x = x0 + (i % 2) * (size + 2)
        y = 4 + (i // 2) * (size + 4) + (i % 2) * 6
        box = (x, y, x + size, y + size)
        colour = COLOURS[scene.colour]
        if scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=colour)
    return image


def _colour_question(scene: Scene) -> tuple[str, str, str, str]:
    noun = scene.shape if scene.count == 1 else scene.shape + "s"
    verb = "is the" if scene.count == 1 else "are the"
    return f"What color {verb} {noun}?", scene.colour, "what color is the", "other"


def _shape_question(scene: Scene) -> tuple[str, str, str, str]:
    return "What shape is shown in the picture?", scene.shape, "what shape is", "other"


def _count_question(scene: Scene) -> tuple[str, str, str, str]:
    return f"How many {scene.shape}s are there?", str(scene.count), "how many", "number"


def _side_question(scene: Scene) -> tuple[str, str, str, str]:
    return f"Are the {scene.colour} shapes on the left or the right?", scene.side, "are the", "other"


def _yes_no_question(scene: Scene) -> tuple[str, str, str, str]:
    return f"Is there a {scene.colour} {scene.shape}?", "yes", "is there a", "yes/no"


QUESTION_KINDS = [_colour_question, _shape_question, _count_question, _side_question, _yes_no_question]


def annotator_answers(rng: random.Random, answer: str, answer_type: str) -> list[str]:
    """Ten answers with realistic disagreement: usually 7-10 agree, sometimes only 3."""
    agreeing = rng.choice((10, 10, 9, 8, 7, 6, 3))
    answers = [surface_form(rng, answer, answer_type) for _ in range(agreeing)]
    wrong_pool = CONFUSIONS.get(answer, [])
    if answer_type == "number":
        wrong_pool = [str(n) for n in range(1, 6) if str(n) != answer]
    elif answer_type == "yes/no":
        wrong_pool = ["no"]
    answers += [rng.choice(wrong_pool) for _ in range(10 - agreeing)]
    rng.shuffle(answers)
    return answers


def surface_form(rng: random.Random, answer: str, answer_type: str) -> str:
    """One annotator's spelling of `answer`: number words, articles, capitals, full stops."""
    roll = rng.random()
    if answer_type == "number" and roll < 0.3:
        return NUMBER_WORDS[int(answer)]
    if answer_type == "other" and roll < 0.1:
        return f"a {answer}"
    if roll < 0.15:
        return answer.capitalize()
    if roll < 0.2:
        return answer + "."
    return answer


def most_common(answers: list[str]) -> str:
    """The most frequent answer; ties go to the first occurrence (docs/formats.md §3.1)."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: counts[a])


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=None) + "\n", encoding="utf-8")
