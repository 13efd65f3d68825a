"""Supervised fine-tuning of PointerSelectorV2 on beam data: how the demo gets its SFT checkpoint.

Lever-LM trains its v2 pointer by teacher forcing on beam search results: for a query and one of
its beams [icd_1, ..., icd_k], step t is a classification over the whole pool (the query itself
and the ICDs already given excluded) whose target is icd_t; the loss is the mean cross-entropy
over steps and beams. This module does the same with plain torch -- no Lightning, no CLIP towers:
the pool is the embeddings file, as in the RL generator -- and saves the Lightning checkpoint
layout the generator loads. It exists for the embedded demo and for tests; real SFT checkpoints
come from Lever-LM.

    python -m lever_lm.models.v2.train_sft --beam_data B.json --emb E.pt --out sft.ckpt [--hidden_dim 64 ...]

Deterministic: the seed fixes the initial weights and the batch order.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lever_lm.data.beam_data import BeamData, load_beam_data
from lever_lm.data.embeddings import load_embeddings
from lever_lm.errors import InputError, exit_on_input_error
from lever_lm.models.v2.checkpoint import save_pointer_checkpoint
from lever_lm.models.v2.pointer_selector import PointerSelectorV2

log = logging.getLogger(__name__)


def beam_examples(beam: BeamData) -> tuple[Tensor, Tensor]:
    """Training pairs from every beam: query rows [M] and ICD label sequences [M, shot_num]."""
    queries, labels = [], []
    for query in beam.query_ids:
        for icds in beam.icd_sequences(query):
            if query in icds or len(set(icds)) != len(icds):
                raise InputError(beam.path, f"query {query}: beam {icds + [query]} repeats an id; cannot train on it")
            queries.append(query)
            labels.append(icds)
    return torch.tensor(queries, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def sft_loss(model: PointerSelectorV2, queries: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
    """Mean teacher-forced cross-entropy of the label sequences over the whole pool."""
    log_probs = model(embeddings[queries], embeddings, labels, exclude=queries)  # [B, S, K]
    return -log_probs.gather(2, labels.unsqueeze(2)).mean()


def train_pointer_sft(
    beam: BeamData,
    embeddings: Tensor,
    *,
    hidden_dim: int = 256,
    num_layers: int = 1,
    use_gate: bool = True,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> PointerSelectorV2:
    """A pointer trained on `beam` with the pool = all rows of `embeddings` [N, d]; eval mode."""
    if embeddings.ndim != 2 or max(beam.query_ids) >= embeddings.shape[0]:
        raise InputError(beam.path, f"beam data ids do not fit embeddings of shape {list(embeddings.shape)}")
    queries, labels = beam_examples(beam)
    torch.manual_seed(seed)
    model = PointerSelectorV2(embeddings.shape[1], hidden_dim=hidden_dim, num_layers=num_layers, use_gate=use_gate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(queries), generator=order_rng)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = sft_loss(model, queries[batch], labels[batch], embeddings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, total / len(order))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the v2 pointer on beam data (teacher forcing); write a .ckpt.")
    parser.add_argument("--beam_data", type=Path, required=True, help="beam data JSON (docs/formats.md §3.2)")
    parser.add_argument(
        "--emb", type=Path, required=True, help="embeddings of the training split (.pt, [N, d]): the pool"
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (Lightning layout)")
    parser.add_argument("--hidden_dim", type=int, default=256, help="hidden size h (default: 256)")
    parser.add_argument("--num_layers", type=int, default=1, help="cross-attention layers L (default: 1)")
    parser.add_argument(
        "--use_gate", action=argparse.BooleanOptionalAction, default=True, help="query update gate (default: on)"
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the beams (default: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--batch_size", type=int, default=32, help="beams per step (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of initial weights and batch order (default: 0)")
    parser.add_argument(
        "--num_threads", type=int, default=1, help="torch CPU threads (default: 1; the demo's matrices are tiny)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)  # more threads on tiny matrices only spin: 7x slower on a busy 2-core box
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_input_error():
        embeddings = load_embeddings(args.emb)
        beam = load_beam_data(args.beam_data, num_items=embeddings.shape[0])
        settings = dict(
            hidden_dim=args.hidden_dim,
            num_layers=args.num_layers,
            use_gate=args.use_gate,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        model = train_pointer_sft(
            beam, embeddings, **settings, on_epoch_end=lambda e, loss: log.info("epoch %d: loss %.4f", e + 1, loss)
        )
        save_pointer_checkpoint(
            model, args.out, hyper_parameters={"trainer": "lever_lm.models.v2.train_sft", **settings}
        )
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
