"""VQA accuracy: the answer normalisation of the official evaluator and the 10-annotator score.

    python -m lever_lm.vqa.metric --questions Q.json --annotations A.json --results R.json [--mode always|official]

`acc = mean over the n human answers i of min(1, #{j != i : answer_j == prediction} / 3)` (docs/formats.md §5),
so with 10 answers the possible values are 0, 0.3, 0.6, 0.9 and 1.0.

Two modes decide *when* answers are normalised (the normalisation itself is the official one:
punctuation rules, number words to digits, articles dropped, the contraction table):

* `"always"` (default): the prediction and every human answer are normalised, always -- what the
  Lever-LM lineage's evaluator does.
* `"official"`: the VQA API's evaluation script (`vqaEval.py`) in the form OpenFlamingo ships it
  (`open_flamingo/eval/vqa_metric.py`), from which the lineage's evaluation descends: answers are
  only stripped of tabs, newlines and outer spaces, and both sides are normalised only when the
  human answers are not all identical. (The 2015 GT-Vision-Lab release differs slightly: it always
  normalises the prediction and applies only the punctuation rule to disagreeing human answers.)

The RL generator scores ~10 candidates per question, so the human answers are prepared once per
question (`prepare_answers`): every distinct prepared answer gets its score up front, and scoring a
candidate (`score_prediction`) is one normalisation of the prediction plus a dict look-up.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lever_lm.data.vqa import load_annotations
from lever_lm.errors import InputError, exit_on_input_error
from lever_lm.io import read_json

MODES = ("always", "official")

# The official evaluator's tables (vqaEval.py), unchanged.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Verbatim from vqaEval.py, quirks included: `(?!<=\d)` is a look-ahead (a look-behind was meant), so
# every "." not followed by a digit goes; and `re.UNICODE` lands in the `count` argument of `sub`,
# so at most 32 of them are removed. Kept as is: scores must equal the official ones.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = re.UNICODE
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def clean_whitespace(answer: str) -> str:
    """Tabs and newlines to spaces, outer spaces stripped: the only change every answer gets."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official punctuation rule: a mark next to a space (or any mark in a text holding a
    digit-comma-digit group) is deleted, any other mark becomes a space; then periods go."""
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if mark not in out:
            continue  # replacing an absent mark changes nothing, whichever branch
        if delete_all or (mark + " " in text or " " + mark in text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digits_and_articles(text: str) -> str:
    """Lower-case, number words to digits, drop a/an/the, expand the contraction table."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


@lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    """The full official normalisation of one answer (cached: models repeat their answers)."""
    return process_digits_and_articles(process_punctuation(clean_whitespace(answer)))


@dataclass(frozen=True)
class PreparedAnswers:
    """One question's human answers, normalised once, with the score of every possible match.

    `scores` maps a prepared answer to the accuracy a prediction equal to it earns; any other
    prediction scores 0. `normalize_prediction` says whether predictions must be normalised
    before the look-up (always in mode "always"; in mode "official" only when answers disagree).
    """

    scores: Mapping[str, float]
    normalize_prediction: bool
    num_answers: int


def prepare_answers(gt_answers: list[str], mode: str = "always") -> PreparedAnswers:
    """Normalise a question's human answers once and score every distinct one."""
    _check_mode(mode)
    if not gt_answers:
        raise ValueError("a question needs at least one human answer to be scored")
    cleaned = [clean_whitespace(answer) for answer in gt_answers]
    normalize = mode == "always" or len(set(cleaned)) > 1
    prepared = [normalize_answer(answer) for answer in cleaned] if normalize else cleaned
    counts: dict[str, int] = defaultdict(int)
    for answer in prepared:
        counts[answer] += 1
    n = len(prepared)
    scores = {answer: _accuracy_of_count(count, n) for answer, count in counts.items()}
    return PreparedAnswers(scores=scores, normalize_prediction=normalize, num_answers=n)


def _accuracy_of_count(count: int, n: int) -> float:
    """Mean over the n answers i of min(1, #{j != i matching} / 3), for `count` matching answers.

    The `count` matching annotators each see count-1 other matches, the n-count others see count;
    summing min(3, matches) in integers and dividing once gives the exact value (0.9, not 0.8999...).
    """
    thirds = count * min(3, count - 1) + (n - count) * min(3, count)
    return thirds / (3 * n)


def score_prediction(prediction: str, prepared: PreparedAnswers) -> float:
    """The VQA accuracy of one (post-processed) prediction against prepared human answers."""
    key = normalize_answer(prediction) if prepared.normalize_prediction else clean_whitespace(prediction)
    return prepared.scores.get(key, 0.0)


def vqa_accuracy(prediction: str, gt_answers: list[str], mode: str = "always") -> float:
    """The VQA accuracy of `prediction` against the human answers (docs/formats.md §5); see the module doc."""
    return score_prediction(prediction, prepare_answers(gt_answers, mode))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; choose one of {', '.join(MODES)}")


# ---------------------------------------------------------------------------------------------
# The command: score a results file as the official evaluator does.


@dataclass(frozen=True)
class Evaluation:
    """Accuracies in percent, rounded to 2 decimals as the official evaluator reports them."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    num_questions: int


def evaluate_results(
    questions_path: Path, annotations_path: Path, results_path: Path, mode: str = "always"
) -> Evaluation:
    """Score every `{"question_id", "answer"}` of a results file against the annotations."""
    _check_mode(mode)
    question_ids = _question_ids(questions_path)
    annotations = _annotations(annotations_path)
    results = _results(results_path)
    per_question: list[tuple[float, str, str]] = []
    for question_id, answer in results:
        if question_id not in question_ids:
            raise InputError(results_path, f"question_id {question_id} is not in the questions file {questions_path}")
        annotation = annotations.get(question_id)
        if annotation is None:
            raise InputError(results_path, f"question_id {question_id} has no annotation in {annotations_path}")
        gt_answers, answer_type, question_type = annotation
        accuracy = vqa_accuracy(answer, gt_answers, mode)
        per_question.append((accuracy, answer_type, question_type))
    if not per_question:
        raise InputError(results_path, "no results to score")
    return Evaluation(
        overall=_percent([acc for acc, _, _ in per_question]),
        per_answer_type=_grouped_percent(per_question, 1),
        per_question_type=_grouped_percent(per_question, 2),
        num_questions=len(per_question),
    )


def _percent(values: list[float]) -> float:
    return round(100 * float(sum(values)) / len(values), 2)


def _grouped_percent(rows: list[tuple[float, str, str]], column: int) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        groups[row[column]].append(row[0])
    return {name: _percent(values) for name, values in groups.items()}


def _question_ids(path: Path) -> set[int]:
    questions = read_json(path).get("questions")
    if not isinstance(questions, list) or not all(isinstance(q, dict) for q in questions):
        raise InputError(path, "missing the 'questions' list of objects (is this an official VQA questions file?)")
    return {q.get("question_id") for q in questions}


def _annotations(path: Path) -> dict[int, tuple[list[str], str, str]]:
    """question_id -> (raw human answers, answer type, question type)."""
    out = {}
    for question_id, record in load_annotations(path).items():
        answers = record.get("answers")
        texts = [a.get("answer") if isinstance(a, dict) else None for a in answers] if isinstance(answers, list) else []
        if not texts or not all(isinstance(text, str) for text in texts):
            raise InputError(path, f"question_id {question_id} lacks a list of answers with 'answer' texts")
        out[question_id] = (texts, str(record.get("answer_type")), str(record.get("question_type")))
    return out


def _results(path: Path) -> list[tuple[int, str]]:
    data = read_json(path, expect=list)
    results, seen = [], set()
    for record in data:
        question_id = record.get("question_id") if isinstance(record, dict) else None
        answer = record.get("answer") if isinstance(record, dict) else None
        if not isinstance(question_id, int) or isinstance(question_id, bool) or not isinstance(answer, str):
            raise InputError(
                path, f'every result must be {{"question_id": int, "answer": str}}, found {str(record)[:200]}'
            )
        if question_id in seen:
            raise InputError(path, f"question_id {question_id} is answered twice")
        seen.add(question_id)
        results.append((question_id, answer))
    return results


def format_evaluation(evaluation: Evaluation) -> str:
    """The official evaluator's report: overall, then per answer type, accuracies in percent."""
    lines = [f"Overall Accuracy is: {evaluation.overall:.02f}", "", "Per Answer Type Accuracy is the following:"]
    lines += [f"{name} : {value:.02f}" for name, value in sorted(evaluation.per_answer_type.items())]
    lines += ["", f"({evaluation.num_questions} questions scored)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lever_lm.vqa.metric",
        description="Score a VQA results file ([{question_id, answer}]) with the VQA accuracy metric.",
    )
    parser.add_argument("--questions", type=Path, required=True, help="official VQA questions JSON")
    parser.add_argument("--annotations", type=Path, required=True, help="official VQA annotations JSON")
    parser.add_argument(
        "--results", type=Path, required=True, help='results JSON: [{"question_id": int, "answer": str}]'
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="always",
        help="always: normalise prediction and answers every time (the lineage's evaluator, default); "
        "official: normalise only when the annotators disagree (the official script)",
    )
    args = parser.parse_args(argv)
    with exit_on_input_error():
        evaluation = evaluate_results(args.questions, args.annotations, args.results, args.mode)
    print(format_evaluation(evaluation))


if __name__ == "__main__":
    main(sys.argv[1:])
