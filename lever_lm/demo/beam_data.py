"""Beam data for the demo (docs/formats.md §3.2), made deterministically from the demo data set and embeddings.

Real beam data comes from Lever-LM's data generation: a beam search over ICD sequences scored by
how much each added ICD raises a large VLM's probability of the right answer. The demo has no such
VLM, so the gain of adding candidate c after the ICDs P already picked for query q is a stand-in
that favours what usually helps a VLM and that a pointer network can learn from embeddings:

    gain(c | q, P) = [question_type(c) == question_type(q)]          same kind of question
                     + cos(e_q, e_c)                                  similar image and question
                     - 0.5 * max_{p in P} cos(e_c, e_p)               not a near-copy of a picked ICD

Queries: `num_queries` rows drawn with `random.Random(seed)`, written in ascending order. For
each, a beam search of width `beam_size` over sequences of `shot_num` distinct ICDs (the query
excluded) ranks sequences by their summed gain; `id_list` holds the final beams best first, each
ending with the query row, and `score_list` the gain of each beam's last step (Lever-LM's
convention). Ties break toward lower ids, so the output depends only on the inputs and the seed.

    python -m lever_lm.demo.beam_data --emb data/demo/emb/query_embeddings.pt --out data/demo/beam_data.json \
        --train_ques_path ... --train_ann_path ... --train_image_root ...
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lever_lm.data.beam_data import save_beam_data
from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
from lever_lm.data.embeddings import load_embeddings
from lever_lm.data.vqa import VQADataset
from lever_lm.errors import InputError, exit_on_input_error

log = logging.getLogger(__name__)

SAME_TYPE_BONUS = 1.0
REDUNDANCY_PENALTY = 0.5


def build_demo_beam_data(
    dataset: VQADataset,
    embeddings: Tensor,
    num_queries: int,
    shot_num: int = 2,
    beam_size: int = 5,
    seed: int = 0,
) -> dict:
    """`{str(query_row): {"id_list": [[icd_1, ..., icd_k, query_row], ...], "score_list": [...]}}`."""
    n = len(dataset)
    if embeddings.shape[0] != n:
        raise InputError(None, f"embeddings have {embeddings.shape[0]} rows, the data set {n} items")
    if not 1 <= num_queries <= n:
        raise InputError(None, f"num_queries must be in 1..{n}, got {num_queries}")
    if not 1 <= shot_num < n or beam_size < 1:
        raise InputError(None, f"need 1 <= shot_num < {n} and beam_size >= 1, got {shot_num}, {beam_size}")
    emb = F.normalize(embeddings.to(torch.float32), dim=-1)
    cosine = emb @ emb.T  # [N, N]
    types = [dataset[i].question_type for i in range(n)]
    queries = sorted(random.Random(seed).sample(range(n), num_queries))
    result = {}
    for query in queries:
        base = cosine[query] + SAME_TYPE_BONUS * torch.tensor([t == types[query] for t in types], dtype=torch.float32)
        sequences, last_gains = beam_search(base, cosine, query, shot_num, beam_size)
        result[str(query)] = {
            "id_list": [seq + [query] for seq in sequences],
            "score_list": [round(g, 6) for g in last_gains],
        }
    return result


def beam_search(
    base: Tensor, cosine: Tensor, query: int, shot_num: int, beam_size: int
) -> tuple[list[list[int]], list[float]]:
    """Best `beam_size` sequences of distinct ids (not `query`) by summed gain; their last-step gains."""
    n = base.shape[0]
    beams: list[list[int]] = [[]]
    totals = torch.zeros(1)
    last = torch.zeros(1)
    for _ in range(shot_num):
        gains = base.expand(len(beams), n).clone()  # [B, N]
        for b, picked in enumerate(beams):
            if picked:
                gains[b] -= REDUNDANCY_PENALTY * cosine[picked].max(dim=0).values
                gains[b, picked] = float("-inf")
        gains[:, query] = float("-inf")
        flat = (totals.view(-1, 1) + gains).flatten()
        order = torch.sort(-flat, stable=True).indices[:beam_size]  # ties: lower (beam, id) first
        order = order[torch.isfinite(flat[order])]
        beams = [beams[int(k) // n] + [int(k) % n] for k in order]
        last = gains.flatten()[order]
        totals = flat[order]
    return beams, last.tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deterministic demo beam data (docs/formats.md §3.2) from a data set and its embeddings.")
    add_dataset_arguments(parser)
    parser.add_argument("--emb", type=Path, required=True, help="embeddings of the training split (.pt, [N, d])")
    parser.add_argument("--out", type=Path, required=True, help="beam data JSON to write")
    parser.add_argument("--num_queries", type=int, default=64, help="queries to draw (default: 64)")
    parser.add_argument("--shot_num", type=int, default=2, help="ICDs per sequence (default: 2)")
    parser.add_argument("--beam_size", type=int, default=5, help="beams kept per query (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query draw (default: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_input_error():
        paths = dataset_paths_from_args(args)
        dataset = VQADataset.load(paths.train_ques_path, paths.train_ann_path, paths.train_image_root)
        embeddings = load_embeddings(args.emb, num_items=len(dataset))
        data = build_demo_beam_data(dataset, embeddings, args.num_queries, args.shot_num, args.beam_size, args.seed)
        save_beam_data(data, args.out)
        log.info("wrote %d queries of beam data to %s", len(data), args.out)


if __name__ == "__main__":
    main()
