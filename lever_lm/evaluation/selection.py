"""Which ICDs each evaluation query gets, by each way of choosing them.

The evaluation queries are validation-split rows; the ICDs are training-split rows (the pool is
the whole training split, as in the lineage's inference). Every choice goes through the RL
generator's proposer (`lever_lm.models.v3.proposals`) in its held-out mode, so the pointer is
decoded exactly as it proposes RL candidates:

* pointer    the top beam of a beam search of width `num_beams` (1: greedy), in prompt order;
* random     `num_random` sequences of distinct rows drawn uniformly, seeded per query;
* retrieval  the lineage's MMTopK: the `shot_num` rows whose embeddings have the largest cosine
             with the query's, the most similar placed last, next to the query (the lineage's
             `mmtopk_reversed_order: true`);
* zero       no ICDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from lever_lm.models.v2.pointer_selector import PointerSelectorV2
from lever_lm.models.v3.proposals import ProposalSettings, Proposer

METHODS = ("pointer", "random", "retrieval", "zero")


@dataclass(frozen=True)
class QueryICDs:
    """The ICD sequences (training rows, prompt order) of one validation query, per method."""

    query_idx: int
    pointer: tuple[int, ...]
    random: tuple[tuple[int, ...], ...]
    retrieval: tuple[int, ...]

    def sequences(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Every method's sequences; a method's score for the query is the mean over its sequences."""
        return {"pointer": (self.pointer,), "random": self.random, "retrieval": (self.retrieval,), "zero": ((),)}


def choose_icds(
    model: PointerSelectorV2,
    query_emb: Tensor,
    cand_emb: Tensor,
    queries: Sequence[int],
    *,
    shot_num: int,
    num_beams: int,
    num_random: int,
    seed: int,
    device: str = "cpu",
) -> list[QueryICDs]:
    """The ICDs of each query (a row of `query_emb`) from the pool `cand_emb` (training rows)."""
    settings = ProposalSettings(
        shot_num=shot_num,
        num_beams=num_beams,
        temps=(),
        num_samples_per_temp=0,
        num_random=num_random,
        num_retrieval=1,
        seed=seed,
    )
    proposer = Proposer(model, query_emb, cand_emb, settings, device=device, held_out=True)
    chosen = []
    for query, by_method in zip(queries, proposer.propose_by_method(queries)):
        top_beam = min(by_method["beam"], key=lambda c: c.beam_rank)
        chosen.append(
            QueryICDs(
                query_idx=int(query),
                pointer=top_beam.pointer,
                random=tuple(c.pointer for c in by_method["random"]),
                retrieval=tuple(reversed(by_method["retrieval"][0].pointer)),
            )
        )
    return chosen
