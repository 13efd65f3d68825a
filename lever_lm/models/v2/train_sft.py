"""Supervised fine-tuning of PointerSelectorV2 on beam data: the SFT checkpoint the RL generator starts from.

Lever-LM trains its v2 pointer by teacher forcing on beam search results: for a query and one of
its beams [icd_1, ..., icd_k], step t is a classification over the whole pool (the query itself
and the ICDs already given excluded) whose target is icd_t; the loss is the mean cross-entropy
over steps and beams. This module does the same with plain torch -- no Lightning, no CLIP towers:
the pool is the embeddings file, as in the RL generator -- and saves the Lightning checkpoint
layout that the generator, the evaluation and the lineage's GRPO trainer load.

Validation: as the lineage's `data_split`, the beam queries are sorted by id and the first
`int(train_ratio * n)` train; the rest are held out, and after every epoch the held-out beams'
mean loss and step accuracy (the share of teacher-forced steps whose most likely item is the
beam's) are logged; the last epoch's go into the metrics file. The checkpoint is the last epoch's.

The lineage's GRPO trainer builds its pointer with hidden size 256 and the query update gate, and
loads a checkpoint into it leniently (a missing gate stays random, without an error), so a
checkpoint meant for it needs `--hidden_dim 256` and the gate (the defaults).

    python -m lever_lm.models.v2.train_sft --beam_data B.json --emb E.pt --out sft.ckpt [--metrics m.json ...]

Deterministic: the seed fixes the initial weights and the batch order; the same inputs and
settings on the same machine give the same checkpoint bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lever_lm.data.beam_data import BeamData, load_beam_data
from lever_lm.data.embeddings import load_embeddings
from lever_lm.errors import InputError, exit_on_input_error
from lever_lm.io import atomic_output
from lever_lm.models.v2.checkpoint import save_pointer_checkpoint
from lever_lm.models.v2.pointer_selector import PointerSelectorV2

log = logging.getLogger(__name__)

# What the lineage's GRPO trainer builds (PointerSelectorV3's default hidden size; it always has the gate).
LINEAGE_HIDDEN_DIM = 256
# Called after every epoch with (epoch, mean training loss, held-out metrics or None).
EpochCallback = Callable[[int, float, "dict[str, float] | None"], None]


def split_queries(beam: BeamData, train_ratio: float) -> tuple[BeamData, BeamData | None]:
    """The lineage's `data_split`: queries sorted by id, the first int(train_ratio * n) train, the rest validate."""
    if not 0 < train_ratio <= 1:
        raise InputError(None, f"train_ratio must be in (0, 1], got {train_ratio}")
    ordered = sorted(beam.query_ids)
    cut = int(train_ratio * len(ordered))
    if cut == 0:
        raise InputError(beam.path, f"train_ratio {train_ratio} leaves none of the {len(ordered)} queries to train on")
    train, val = ordered[:cut], ordered[cut:]
    return _subset(beam, train), (_subset(beam, val) if val else None)


def _subset(beam: BeamData, queries: list[int]) -> BeamData:
    return BeamData(beam.path, queries, beam.shot_num, {q: beam.id_lists[q] for q in queries})


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


def sft_loss(
    model: PointerSelectorV2, queries: Tensor, labels: Tensor, embeddings: Tensor, dropout: float = 0.0
) -> Tensor:
    """Mean teacher-forced cross-entropy of the label sequences over the whole pool."""
    log_probs = model(embeddings[queries], embeddings, labels, exclude=queries, dropout=dropout)  # [B, S, K]
    return -log_probs.gather(2, labels.unsqueeze(2)).mean()


def lineage_init(model: PointerSelectorV2) -> None:
    """The lineage's initial weights (its `_init_weights`): Xavier input projection, query and candidate
    projections at the identity plus N(0, 0.01) noise (so the untrained pointer ranks by the cosine of
    the projected embeddings), Xavier gate with zero bias. Draws from torch's global generator."""
    with torch.no_grad():
        if isinstance(model.input_proj, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(model.input_proj.weight)
        for projection in (model.query_proj, model.cand_proj):
            torch.nn.init.eye_(projection.weight)
            projection.weight.add_(torch.randn_like(projection.weight) * 0.01)
        if model.query_update_gate is not None:
            torch.nn.init.xavier_uniform_(model.query_update_gate.weight)
            torch.nn.init.zeros_(model.query_update_gate.bias)


@torch.no_grad()
def held_out_metrics(model: PointerSelectorV2, beam: BeamData, embeddings: Tensor) -> dict[str, float]:
    """Teacher-forced loss and step accuracy (most likely item == the beam's) on `beam`'s beams."""
    was_training = model.training
    model.eval()
    queries, labels = beam_examples(beam)
    log_probs = model(embeddings[queries], embeddings, labels, exclude=queries)
    loss = -log_probs.gather(2, labels.unsqueeze(2)).mean()
    accuracy = (log_probs.argmax(dim=2) == labels).double().mean()
    model.train(was_training)
    return {"loss": float(loss), "accuracy": float(accuracy)}


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
    dropout: float = 0.0,
    init: str = "torch",
    val: BeamData | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> PointerSelectorV2:
    """A pointer trained on `beam` with the pool = all rows of `embeddings` [N, d]; eval mode.

    `val`: held-out beams, measured after every epoch (`on_epoch_end`); they do not change training.
    """
    if embeddings.ndim != 2 or max(beam.query_ids) >= embeddings.shape[0]:
        raise InputError(beam.path, f"beam data ids do not fit embeddings of shape {list(embeddings.shape)}")
    queries, labels = beam_examples(beam)
    torch.manual_seed(seed)
    model = PointerSelectorV2(embeddings.shape[1], hidden_dim=hidden_dim, num_layers=num_layers, use_gate=use_gate)
    if init == "lineage":
        lineage_init(model)
    elif init != "torch":
        raise InputError(None, f"init must be 'lineage' or 'torch', got {init!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(queries), generator=order_rng)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = sft_loss(model, queries[batch], labels[batch], embeddings, dropout)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, total / len(order), held_out_metrics(model, val, embeddings) if val else None)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train the v2 pointer on beam data (teacher forcing); write a .ckpt (Lightning layout)."
    )
    parser.add_argument("--beam_data", type=Path, required=True, help="beam data JSON (docs/formats.md §3.2)")
    parser.add_argument(
        "--emb", type=Path, required=True, help="embeddings of the training split (.pt, [N, d]): the pool"
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (Lightning layout)")
    parser.add_argument(
        "--metrics", type=Path, help="JSON to write the last epoch's sft_train_loss, sft_val_loss, sft_val_acc into"
    )
    parser.add_argument("--hidden_dim", type=int, default=256, help="hidden size h (default: 256)")
    parser.add_argument("--num_layers", type=int, default=1, help="cross-attention layers L (default: 1)")
    parser.add_argument(
        "--use_gate", action=argparse.BooleanOptionalAction, default=True, help="query update gate (default: on)"
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the beams (default: 20)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    parser.add_argument("--batch_size", type=int, default=32, help="beams per step (default: 32)")
    parser.add_argument(
        "--train_ratio",
        type=float,
        default=0.9,
        help="share of the beam queries (lowest ids first) to train on; the rest validate (default: 0.9)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of initial weights and batch order (default: 0)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout before the projections (default: 0)")
    parser.add_argument(
        "--init", choices=("torch", "lineage"), default="torch", help="initial weights (default: torch)"
    )
    parser.add_argument(
        "--num_threads", type=int, default=1, help="torch CPU threads (default: 1; the demo's matrices are tiny)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)  # more threads on tiny matrices only spin: 7x slower on a busy 2-core box
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_input_error():
        embeddings = load_embeddings(args.emb)
        beam = load_beam_data(args.beam_data, num_items=embeddings.shape[0])
        train, val = split_queries(beam, args.train_ratio)
        settings = dict(
            hidden_dim=args.hidden_dim,
            num_layers=args.num_layers,
            use_gate=args.use_gate,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            dropout=args.dropout,
            init=args.init,
        )
        _warn_if_unreadable_by_the_lineage(args.hidden_dim, args.use_gate)
        log.info(
            "training on %d beam queries, validating on %d", len(train.query_ids), len(val.query_ids) if val else 0
        )
        last: dict = {}

        def report(epoch: int, loss: float, held_out: dict | None) -> None:
            last.update(sft_train_loss=loss, **({f"sft_val_{k}": v for k, v in held_out.items()} if held_out else {}))
            shown = (
                f", held-out loss {held_out['loss']:.4f}, step accuracy {held_out['accuracy']:.3f}" if held_out else ""
            )
            log.info("epoch %d: loss %.4f%s", epoch + 1, loss, shown)

        model = train_pointer_sft(train, embeddings, **settings, val=val, on_epoch_end=report)
        hyper_parameters = {"trainer": "lever_lm.models.v2.train_sft", **settings, "train_ratio": args.train_ratio}
        save_pointer_checkpoint(model, args.out, hyper_parameters=hyper_parameters)
        log.info("wrote %s", args.out)
        if args.metrics:
            write_metrics(args.metrics, last)


def write_metrics(path: Path, last: dict) -> None:
    """The last epoch's losses and held-out step accuracy (null without held-out queries)."""
    metrics = {
        "sft_train_loss": round(last["sft_train_loss"], 4) if "sft_train_loss" in last else None,
        "sft_val_loss": round(last["sft_val_loss"], 4) if "sft_val_loss" in last else None,
        "sft_val_acc": round(last["sft_val_accuracy"], 4) if "sft_val_accuracy" in last else None,
    }
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def _warn_if_unreadable_by_the_lineage(hidden_dim: int, use_gate: bool) -> None:
    if hidden_dim != LINEAGE_HIDDEN_DIM or not use_gate:
        log.warning(
            "hidden_dim %d, gate %s: the lineage's GRPO trainer builds hidden size %d with the gate and cannot "
            "load this checkpoint as it is (this project's generator and evaluation can)",
            hidden_dim,
            "on" if use_gate else "off",
            LINEAGE_HIDDEN_DIM,
        )


if __name__ == "__main__":
    main()
