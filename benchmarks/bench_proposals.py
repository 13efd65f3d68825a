"""Time candidate proposals per query against the lineage-style loop baseline (issue 4).

    .venv/bin/python benchmarks/bench_proposals.py            # K = 9,009 and 443,757, d = 512
    .venv/bin/python benchmarks/bench_proposals.py --pool-sizes 9009 --queries 64

The model is a PointerSelectorV2 (d = 512, h = 256, 1 layer, with gate) with seeded random
weights; the pool is seeded random unit vectors (CLIP embeddings are unit vectors too). The fast
path (`Proposer`) proposes the full default set (5 beams, temps 1.0 1.3 x 2 samples, 1 random,
shot 2) for `--queries` queries in batches. The baseline does what the lineage's code did --
expand every beam with a Python loop over the pool, one `.item()` per candidate, then sort all
expansions -- and samples one sequence at a time; unlike the lineage, it reuses the encoded pool
instead of re-projecting it at every step, so the ratio printed is conservative. The baseline is
slow (seconds per query at K = 443,757), so it is timed on `--baseline-queries` queries only and
its per-query time is compared with the fast path's amortised per-query time. Both run in the
same process, one after the other, on the same data. Encoding the pool (once per run) is timed
separately and not part of the per-query times.

OpenMP threads that busy-wait between parallel regions collapse when another process holds a
core (measured here: 350 ms/query instead of 45 at K = 443,757), so this script defaults to
OMP_WAIT_POLICY=PASSIVE; set OMP_WAIT_POLICY=ACTIVE to compare.
"""

from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()  # before torch is imported (lever_lm.process)

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lever_lm.models.v2.pointer_selector import PointerSelectorV2, PoolEncoding  # noqa: E402
from lever_lm.models.v3.proposals import ProposalSettings, Proposer, query_generator  # noqa: E402


def loop_baseline(
    model: PointerSelectorV2, pool: PoolEncoding, query_emb: torch.Tensor, query_idx: int, settings: ProposalSettings
) -> list[tuple[list[int], float, float]]:
    """Lineage-style proposals for one query; returns the beams as (pointer, logprob, prob sum)."""
    K = pool.size
    q = torch.tensor([query_idx])
    state0 = model.encode_queries(query_emb[q], pool, exclude=q)
    # beam search: one distribution per beam, then a Python loop over the pool per beam
    beams = [([], 0.0, 0.0, state0)]
    for _ in range(settings.shot_num):
        expansions = []
        for pointer, logprob, prob, state in beams:
            banned = torch.tensor([[query_idx, *pointer]])
            log_probs = model.next_log_probs(state, pool, banned)[0]
            probs = log_probs.exp()
            for idx in range(K):
                if idx == query_idx or idx in pointer:
                    continue
                expansions.append((pointer + [idx], logprob + log_probs[idx].item(), prob + probs[idx].item(), state))
        expansions.sort(key=lambda e: e[1], reverse=True)
        beams = [
            (p, lp, pr, model.advance(st, torch.tensor([p[-1]]), pool))
            for p, lp, pr, st in expansions[: settings.num_beams]
        ]
    # temperature samples, one sequence and one step at a time
    generator = query_generator(settings.seed, query_idx)
    for temp in settings.temps:
        for _ in range(settings.num_samples_per_temp):
            pointer, state = [], state0
            for _ in range(settings.shot_num):
                banned = torch.tensor([[query_idx, *pointer]])
                probs = torch.softmax(model.step_logits(state, pool).scatter(1, banned, float("-inf")) / temp, -1)
                pick = int(torch.multinomial(probs[0], 1, generator=generator))
                pointer.append(pick)
                state = model.advance(state, torch.tensor([pick]), pool)
    return [(p, lp, pr) for p, lp, pr, _ in beams]


def bench_pool(K: int, args: argparse.Namespace, settings: ProposalSettings) -> None:
    torch.manual_seed(args.seed)
    model = PointerSelectorV2(args.dim, args.hidden, num_layers=1, use_gate=True).eval()
    emb = F.normalize(torch.randn(K, args.dim, generator=torch.Generator().manual_seed(args.seed)), dim=1)
    queries = torch.randperm(K, generator=torch.Generator().manual_seed(args.seed + 1))[: args.queries].tolist()

    start = time.perf_counter()
    proposer = Proposer(model, emb, emb, settings, query_batch_size=args.batch_size)
    encode_s = time.perf_counter() - start

    proposer.propose(queries[:2])  # warm-up (allocator, thread pool)
    runs = []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        proposals = proposer.propose(queries)
        runs.append(((time.perf_counter() - start) / len(queries), (time.process_time() - cpu) / len(queries)))
    fast_s, fast_cpu = min(runs)
    n_candidates = sum(len(p.candidates) for p in proposals) / len(proposals)

    baseline_ids = queries[: args.baseline_queries]
    start = time.perf_counter()
    with torch.no_grad():
        baseline = [loop_baseline(model, proposer.pool, emb, q, settings) for q in baseline_ids]
    base_s = (time.perf_counter() - start) / max(1, len(baseline_ids))

    same = all(
        [list(c.pointer) for c in p.candidates if c.gen_method == "beam"] == [b[0] for b in beams]
        for p, beams in zip(proposals, baseline)
    )
    print(
        f"K = {K:,}  d = {args.dim}  h = {args.hidden}  gate  shot {settings.shot_num}  "
        f"batch {args.batch_size}  threads {torch.get_num_threads()}"
    )
    print(f"  encode pool (once)      {encode_s:8.2f} s")
    print(
        f"  fast, per query         {fast_s * 1e3:8.1f} ms   (best of {args.repeats} runs of {len(queries)} queries; "
        f"CPU time {fast_cpu * 1e3:.1f} ms; {n_candidates:.1f} candidates/query after de-dup)"
    )
    print(f"    all runs (wall ms)    {'  '.join(f'{w * 1e3:.1f}' for w, _ in runs)}")
    print(f"  loop baseline, per query{base_s * 1e3:9.1f} ms   ({len(baseline_ids)} queries)")
    print(f"  speed-up                {base_s / fast_s:8.0f} x   (beams identical to baseline: {same})")
    print(f"  peak RSS so far         {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MB")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[9_009, 443_757])
    parser.add_argument("--queries", type=int, default=128, help="queries timed on the fast path")
    parser.add_argument("--baseline-queries", type=int, default=2, help="queries timed on the loop baseline")
    parser.add_argument("--batch-size", type=int, default=64, help="queries per batch on the fast path")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the fast path (best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ProposalSettings()  # the seed's defaults: 5 beams, temps 1.0 1.3 x 2, 1 random, shot 2
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, torch {torch.__version__}"
    )
    for K in args.pool_sizes:
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        bench_pool(K, args, settings)
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
