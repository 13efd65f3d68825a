"""Beam data for the demo (docs/formats.md §3.2), made as Lever-LM makes its own: a beam search by InfoScore.

Lever-LM scores an ICD by how much it raises the VLM's probability of the query's right answer.
With p(S) = the VLM's probability of the query's answer after the ICD sequence S (teacher-forced, in
the generator's own prompt format), adding candidate c to the ICDs S already picked scores

    InfoScore(c | S, q) = p(S + [c]) - p(S)

p is Lever-LM's: exp(-mean token cross-entropy) of the answer and the end-of-turn token
(`lever_lm.demo.train_vlm.answer_losses`), the answer being the query's `icd_answer`. Prompts are
built and encoded by the demo VLM trainer's code, which the tests hold token for token equal to
the backend's -- one prompt path for training, beam data and scoring.

Queries: `num_queries` rows drawn with `random.Random(seed)`, in ascending order. Each query gets
a candidate pool of `candidate_num` other rows drawn at random from the same generator (Lever-LM's
random candidate sampler), and a beam search of width `beam_size` over sequences of `shot_num`
distinct pool items: each step scores every (beam, candidate) pair and keeps the `beam_size`
best. Beams are ranked by their summed InfoScore, which telescopes to p(all ICDs) - p(no ICD);
Lever-LM ranks by the last step's InfoScore alone, which on a VLM whose probability saturates
keeps the beams whose first ICD did NOT help (they have the most room left to gain). A new ICD
goes after the ICDs already picked (Lever-LM puts it in front), so `id_list` holds each beam in
prompt order (ICDs, then the query), best beam first; `score_list` holds each beam's last-step InfoScore (docs/formats.md §3.2). Ties
break toward the lower beam, then the lower id.

Cost: about candidate_num * (1 + beam_size * (shot_num - 1)) prompts per query (380 on the demo),
scored in batches; about 40 s for the demo's 64 queries on one CPU thread. Deterministic:
the same inputs and seed on the same machine give the same file.

    python -m lever_lm.demo.beam_data --vqa_model data/demo/models/qwen2.5-vl-demo --out data/demo/beam_data.json \\
        --train_ques_path ... --train_ann_path ... --train_image_root ...
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from lever_lm.data.beam_data import save_beam_data
from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
from lever_lm.data.vqa import VQADataset
from lever_lm.demo.train_vlm import PromptEncoder, TrainingImages, answer_losses, deterministic_torch, training_prompt
from lever_lm.errors import InputError, exit_on_input_error
from lever_lm.vqa.model_config import resolve_settings

log = logging.getLogger(__name__)

# p(S) for one query and many ICD sequences S: a tensor [len(sequences)] of probabilities.
AnswerProbability = Callable[[int, Sequence[Sequence[int]]], Tensor]


class VLMAnswerProbability:
    """p(S): the VLM's teacher-forced probability of a query's answer after the ICD sequence S."""

    def __init__(self, model, encoder: PromptEncoder, dataset: VQADataset, batch_size: int = 64):
        self.model, self.encoder, self.dataset, self.batch_size = model, encoder, dataset, batch_size

    @classmethod
    def load(cls, model_dir: str | Path, dataset: VQADataset, batch_size: int = 64) -> VLMAnswerProbability:
        """The VLM directory's model (eval, CPU) with the prompt encoder the demo VLM was trained with."""
        from lever_lm.vqa.backends.image_text_to_text import check_model_dir, load_model_and_processor

        settings = resolve_settings("chat")
        model, processor = load_model_and_processor(check_model_dir(Path(model_dir)), torch.device("cpu"), settings)
        images = TrainingImages(processor, settings)
        images.freeze(model)  # image features are computed once per picture
        encoder = PromptEncoder(processor, settings, images, train_on_icd_answers=False)
        return cls(model, encoder, dataset, batch_size)

    @torch.no_grad()
    def __call__(self, query: int, sequences: Sequence[Sequence[int]]) -> Tensor:
        answer = self.dataset[query].icd_answer
        prompts = [training_prompt(self.dataset, query, icds) for icds in sequences]
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            out.append(torch.exp(-answer_losses(self.model, self.encoder.encode(chunk, [answer] * len(chunk)))))
        return torch.cat(out)


def build_demo_beam_data(
    num_items: int,
    probability: AnswerProbability,
    num_queries: int,
    candidate_num: int = 64,
    shot_num: int = 2,
    beam_size: int = 5,
    seed: int = 0,
) -> dict:
    """`{str(query_row): {"id_list": [[icd_1, ..., icd_k, query_row], ...], "score_list": [...]}}`."""
    check_beam_settings(num_items, num_queries, candidate_num, shot_num, beam_size)
    rng = random.Random(seed)
    queries = sorted(rng.sample(range(num_items), num_queries))
    result = {}
    for query in queries:
        others = [row for row in range(num_items) if row != query]
        pool = sorted(rng.sample(others, min(candidate_num, len(others))))
        sequences, last_gains = info_score_beam_search(probability, query, pool, shot_num, beam_size)
        result[str(query)] = {
            "id_list": [sequence + [query] for sequence in sequences],
            "score_list": [round(gain, 6) for gain in last_gains],
        }
    return result


def check_beam_settings(num_items: int, num_queries: int, candidate_num: int, shot_num: int, beam_size: int) -> None:
    """Refuse settings the search cannot honour, before any model is loaded."""
    if not 1 <= num_queries <= num_items:
        raise InputError(None, f"num_queries must be in 1..{num_items}, got {num_queries}")
    if not 1 <= shot_num <= min(candidate_num, num_items - 1):
        limit = f"min(candidate_num, {num_items - 1})"
        raise InputError(None, f"shot_num must be in 1..{limit}, got {shot_num} (candidate_num {candidate_num})")
    if beam_size < 1:
        raise InputError(None, f"beam_size must be at least 1, got {beam_size}")


def info_score_beam_search(
    probability: AnswerProbability, query: int, pool: Sequence[int], shot_num: int, beam_size: int
) -> tuple[list[list[int]], list[float]]:
    """The best `beam_size` sequences of distinct pool items by summed InfoScore; each one's last-step InfoScore."""
    beams: list[list[int]] = [[]]
    beam_p = probability(query, [[]]).tolist()  # p of each beam's ICDs
    last_gains = [0.0]
    for _ in range(shot_num):
        expansions = [(b, c) for b, beam in enumerate(beams) for c in pool if c not in beam]
        p = probability(query, [beams[b] + [c] for b, c in expansions]).tolist()
        # summed InfoScore = p(sequence) - p(no ICD): rank by p, ties to the lower (beam, id)
        order = sorted(range(len(expansions)), key=lambda k: (-p[k], expansions[k]))[:beam_size]
        last_gains = [p[k] - beam_p[expansions[k][0]] for k in order]
        beams = [beams[expansions[k][0]] + [expansions[k][1]] for k in order]
        beam_p = [p[k] for k in order]
    return beams, last_gains


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Demo beam data (docs/formats.md §3.2) by InfoScore: beam search scored by the VLM's answer probability."
    )
    add_dataset_arguments(parser)
    parser.add_argument("--vqa_model", type=Path, required=True, help="the VLM directory that scores (the demo VLM)")
    parser.add_argument("--out", type=Path, required=True, help="beam data JSON to write")
    parser.add_argument("--num_queries", type=int, default=64, help="queries to draw (default: 64)")
    parser.add_argument("--candidate_num", type=int, default=64, help="random candidate pool per query (default: 64)")
    parser.add_argument("--shot_num", type=int, default=2, help="ICDs per sequence (default: 2)")
    parser.add_argument("--beam_size", type=int, default=5, help="beams kept per query (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query and pool draws (default: 0)")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per forward pass (default: 64)")
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_input_error():
        if args.batch_size < 1 or args.num_threads < 1:
            raise InputError(None, "--batch_size and --num_threads must be positive")
        paths = dataset_paths_from_args(args)
        dataset = paths.load()
        check_beam_settings(len(dataset), args.num_queries, args.candidate_num, args.shot_num, args.beam_size)
        start = time.perf_counter()
        with deterministic_torch(args.num_threads):
            probability = VLMAnswerProbability.load(args.vqa_model, dataset, args.batch_size)
            settings = (args.num_queries, args.candidate_num, args.shot_num, args.beam_size, args.seed)
            data = build_demo_beam_data(len(dataset), probability, *settings)
        save_beam_data(data, args.out)
        log.info("wrote %d queries of beam data to %s in %.0f s", len(data), args.out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
