"""The lineage's candidate samplers (stage `sample_pools`): the beam queries and each one's pool.

    python -m lever_lm.models.v3.samplers --sampler rand|text_sim|img_sim|mix --num_queries 800 \\
        --pool_size 64 --seed 0 --out sampler_cache.json [--clip_model DIR --device cuda:0] \\
        [--train_* paths | --config C | --dataset D] [--exclude_same_image]

writes the lineage's sampler cache, `{str(query row): [pool rows]}` (docs/formats.md §7), which
the beam data stage searches over and `--pool per_query --sampler cache` reads.

The queries (the lineage's anchors): `num_queries` rows of the training split drawn with
`random.Random(seed)`, in ascending order. Each query's pool holds `pool_size` distinct rows:

  rand      uniform without repetition, from the query's own generator (`query_generator(seed,
            query, "pools")`: the generator's `--sampler rand` draws the very same pools);
  text_sim  the rows whose CLIP question embeddings have the largest cosine with the query's;
  img_sim   the same with CLIP image embeddings;
  mix       the lineage's shares of the three: int(0.5 * pool_size) random, int(0.25 * pool_size)
            by text, the rest by image; the image-nearest are taken first, then the text-nearest
            among the rows left, then random rows among those left, so a pool never repeats a row
            (the lineage concatenates the three and can repeat one). In the lineage's order:
            random, image, text.

Similar rows come nearest first, ties to the lower row (`pools.SimilarPools`).

A pool never holds its query. The lineage searches the top 65 and drops the first hit, taking it
for the query; with duplicate images (every question of a picture has its image embedding) or
duplicate questions, the first hit can be another row, and the query stays in its own pool --
here the query's row is excluded by id before ranking. `--exclude_same_image` also excludes every
row of the query's picture (the lineage keeps them; with img_sim they come first).

Cost: rand needs no model. The similarity samplers embed the whole training split with CLIP
(each picture once): for VQAv2 (443,757 questions, 82,783 pictures) that is the embedding
export's cost, minutes on a GPU.
"""

# ruff: noqa: E402 -- `python -m lever_lm.models.v3.samplers` applies the process settings before torch is imported
from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()

import argparse
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lever_lm.errors import InputError
from lever_lm.models.v3.pools import (
    DEFAULT_POOL_SIZE,
    POOL_STREAM,
    SimilarPools,
    check_enough_rows,
    save_sampler_cache,
)
from lever_lm.models.v3.proposals import ImageGroups, banned_rows, query_generator, random_rows

log = logging.getLogger(__name__)

SAMPLERS = ("rand", "text_sim", "img_sim", "mix")
MIX_SHARES = (("rand", 0.5), ("text_sim", 0.25), ("img_sim", 0.25))  # the lineage's sampler_ratio


def draw_queries(num_items: int, num_queries: int, seed: int) -> list[int]:
    """`num_queries` distinct rows of 0..num_items-1 (the lineage's anchors), ascending."""
    if not 1 <= num_queries <= num_items:
        raise InputError(None, f"--num_queries must be in 1..{num_items}, got {num_queries}")
    return sorted(random.Random(seed).sample(range(num_items), num_queries))


def mix_counts(pool_size: int) -> dict[str, int]:
    """How many rows of a `mix` pool each sampler gives, as the lineage splits them (the last gets the rest)."""
    counts: dict[str, int] = {}
    for name, share in MIX_SHARES[:-1]:
        counts[name] = int(share * pool_size)
    counts[MIX_SHARES[-1][0]] = pool_size - sum(counts.values())
    return counts


def sample_pools(
    sampler: str,
    queries: Sequence[int],
    image_ids: Sequence[int],
    pool_size: int = DEFAULT_POOL_SIZE,
    seed: int = 0,
    exclude_same_image: bool = False,
    text_emb: Tensor | None = None,
    image_emb: Tensor | None = None,
    device: str = "cpu",
) -> dict[int, tuple[int, ...]]:
    """Every query's pool (see the module doc); `text_emb` / `image_emb`: raw CLIP embeddings [N, d]
    of the rows, as the similarity samplers need them."""
    if sampler not in SAMPLERS:
        raise InputError(None, f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if pool_size < 1:
        raise InputError(None, f"--pool_size must be >= 1, got {pool_size}")
    check_enough_rows(queries, image_ids, exclude_same_image, pool_size)
    num_items = len(image_ids)
    groups = ImageGroups(image_ids, num_items) if exclude_same_image else None
    counts = mix_counts(pool_size) if sampler == "mix" else {sampler: pool_size}
    nearest = {}
    for name, emb in (("img_sim", image_emb), ("text_sim", text_emb)):
        if counts.get(name):
            if emb is None:
                raise InputError(None, f"the {name} sampler needs CLIP embeddings (--clip_model)")
            # enough to fill its share after dropping rows another sampler took
            size = counts[name] + (counts.get("img_sim", 0) if name == "text_sim" else 0)
            nearest[name] = dict(zip(queries, SimilarPools(size, emb, emb, groups, device).pools_of(queries)))
    pools = {}
    for q in queries:
        taken: dict[str, list[int]] = {}
        for name in ("img_sim", "text_sim"):
            if name in nearest:
                used = {r for rows in taken.values() for r in rows}
                taken[name] = [r for r in nearest[name][q] if r not in used][: counts[name]]
        if counts.get("rand"):
            used = sorted({r for rows in taken.values() for r in rows}.union(banned_rows(q, groups)))
            generator = query_generator(seed, q, POOL_STREAM)
            taken["rand"] = list(random_rows(generator, used, num_items, counts["rand"]))
        pools[q] = tuple(r for name in ("rand", "img_sim", "text_sim") for r in taken.get(name, ()))
    return pools


def main(argv: list[str] | None = None) -> None:
    from lever_lm.data.dataset_paths import add_dataset_arguments, dataset_paths_from_args
    from lever_lm.embeddings.export import clip_features
    from lever_lm.errors import exit_on_input_error

    parser = argparse.ArgumentParser(
        prog="python -m lever_lm.models.v3.samplers",
        description="The beam queries and each one's candidate pool (the lineage's samplers), written as the "
        "lineage's sampler cache {str(query row): [pool rows]}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_dataset_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="sampler cache JSON to write")
    parser.add_argument("--sampler", choices=SAMPLERS, default="rand", help="how each pool is drawn")
    parser.add_argument("--num_queries", type=int, required=True, help="queries to draw (the lineage's sample_num)")
    parser.add_argument("--pool_size", type=int, default=DEFAULT_POOL_SIZE, help="rows per pool (candidate_num)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the queries' draw and of the random pools")
    parser.add_argument("--exclude_same_image", action="store_true", help="no row of the query's picture in its pool")
    parser.add_argument("--clip_model", help="CLIP model directory (text_sim, img_sim, mix)")
    parser.add_argument("--batch_size", type=int, default=64, help="images / questions per CLIP call")
    parser.add_argument("--device", default="cpu", help="torch device of CLIP and the cosines")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_input_error():
        dataset = dataset_paths_from_args(args).load()
        queries = draw_queries(len(dataset), args.num_queries, args.seed)
        check_enough_rows(queries, dataset.image_ids, args.exclude_same_image, args.pool_size)
        counts = mix_counts(args.pool_size) if args.sampler == "mix" else {args.sampler: args.pool_size}
        image_emb = text_emb = None
        if counts.get("img_sim") or counts.get("text_sim"):
            if not args.clip_model:
                raise InputError(None, f"--sampler {args.sampler} needs --clip_model (CLIP embeds the training split)")
            with torch.inference_mode():
                image_emb, text_emb = clip_features(
                    dataset, args.clip_model, args.batch_size, args.device, not args.no_progress,
                    images=bool(counts.get("img_sim")), texts=bool(counts.get("text_sim")),
                )  # fmt: skip
        pools = sample_pools(
            args.sampler, queries, dataset.image_ids, args.pool_size, args.seed, args.exclude_same_image,
            text_emb, image_emb, args.device,
        )  # fmt: skip
        save_sampler_cache(pools, args.out)
        log.info(
            "wrote the %s pools of %d rows of %d queries to %s", args.sampler, args.pool_size, len(pools), args.out
        )


if __name__ == "__main__":
    main()
