"""Time per-query pools (issue 16): proposals over a 64-row pool, one query at a time, and making the pools.

    .venv/bin/python benchmarks/bench_pools.py                 # N = 9,009 and 443,757, d = 512
    .venv/bin/python benchmarks/bench_pools.py --items 9009 --queries 64

Per-query pools differ from query to query, so the proposer cannot share one pool encoding
across a batch: it encodes each query's pool (64 x d) and proposes for that query alone. This
script measures what that costs per query, with the full default proposal set (5 beams, temps
1.0 1.3 x 2 samples, 1 random, shot 2; d = 512, h = 256, 1 layer with gate, seeded random
weights), and puts it beside the batched global path at K = 9,009 for scale. It also times making
the pools: `rand` (per query) and `sim` (a cosine pass over all N rows per proposal block of 32).
The best of `--repeats` runs counts.
"""

from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()  # before torch is imported (lever_lm.process)

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_proposals import _cpu_name  # noqa: E402

from lever_lm.models.v2.pointer_selector import PointerSelectorV2  # noqa: E402
from lever_lm.models.v3.pools import RandomPools, SimilarPools  # noqa: E402
from lever_lm.models.v3.proposals import ProposalSettings, Proposer  # noqa: E402

BLOCK = 32  # the generator's proposal block


def best_per_query(work, n: int, repeats: int) -> float:
    """Best wall time per item of `work()` over `repeats` runs (after one warm-up)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) / n)
    return min(times)


def bench_items(n_items: int, args: argparse.Namespace, settings: ProposalSettings) -> None:
    torch.manual_seed(args.seed)
    model = PointerSelectorV2(args.dim, args.hidden, num_layers=1, use_gate=True).eval()
    emb = F.normalize(torch.randn(n_items, args.dim, generator=torch.Generator().manual_seed(args.seed)), dim=1)
    queries = torch.randperm(n_items, generator=torch.Generator().manual_seed(args.seed + 1))[: args.queries].tolist()
    rand, sim = RandomPools(args.pool_size, n_items, args.seed, None), SimilarPools(args.pool_size, emb, emb, None)
    pools = rand.pools_of(queries)
    proposer = Proposer(model, emb, emb, settings, per_query=True)
    per_query = best_per_query(lambda: proposer.propose(queries, pools), len(queries), args.repeats)
    rand_s = best_per_query(lambda: rand.pools_of(queries), len(queries), args.repeats)
    sim_s = best_per_query(
        lambda: [sim.pools_of(queries[i : i + BLOCK]) for i in range(0, len(queries), BLOCK)],
        len(queries),
        args.repeats,
    )
    print(
        f"N = {n_items:,}  pool {args.pool_size}  d = {args.dim}  h = {args.hidden}  gate  shot {settings.shot_num}  "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"  per-query proposals, per query   {per_query * 1e3:7.2f} ms   (encode the pool + propose, one query at a time)"
    )
    print(f"  rand pools, per query            {rand_s * 1e3:7.2f} ms")
    print(f"  sim pools, per query             {sim_s * 1e3:7.2f} ms   (blocks of {BLOCK})")
    if n_items <= args.global_max:
        batched = Proposer(model, emb, emb, settings, query_batch_size=64)
        global_s = best_per_query(lambda: batched.propose(queries), len(queries), args.repeats)
        print(f"  global pool (K = {n_items:,}), per query  {global_s * 1e3:7.2f} ms   (batches of 64, for scale)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[9_009, 443_757], help="training rows N")
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--pool-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--global-max", type=int, default=9_009, help="time the global path up to this N")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ProposalSettings()
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    for n_items in args.items:
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        bench_items(n_items, args, settings)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
