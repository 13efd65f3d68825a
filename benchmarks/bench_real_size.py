"""Qwen2.5-VL-3B at real size (random weights) on COCO-size photos, through the generator's backend.

    # CPU: full width, 1 LM layer and 1 vision layer, float32
    .venv/bin/python benchmarks/bench_real_size.py --device cpu --layers 1 --vision_layers 1 --batch_sizes 1 4 8
    # GPU: the whole model in bf16
    python benchmarks/bench_real_size.py --device cuda:0 --agreement --json $OUT/bench.json
    # a smoke run of the script (narrow widths: no figure to read)
    .venv/bin/python benchmarks/bench_real_size.py --device cpu --narrow --queries 1 --candidates 2 --batch_sizes 1 2 --photos 9

The model is the published 3B architecture (`lever_lm.demo.real_size`) with seeded random weights:
the cost per token is the real model's. `--layers` / `--vision_layers` keep the full width at a
lower depth. Inputs are realistic: the 3B model's image processor (min/max pixels), synthetic
640x480 JPEG photos, the default system prompt (the lineage's) and two-shot prompts, through
`Qwen2_5_VLBackend` exactly as the RL generator uses it (`prefetch` per block, then `generate`).
The workload mimics the generator: `--queries` queries x `--candidates` candidates, whose ICDs
come from a per-query shortlist of 8 photos, so every candidate shows its query's photo again.
Answers are forced to `max_new_tokens` (min_new_tokens), so every prompt decodes 5 steps.

It reports prompt and visual tokens, the image work per photo (processor, vision tower), prefill
against decode time, candidates/s per batch size (each from a cold image cache, as a new block
starts), peak memory (CUDA max allocated, or the process's peak RSS), the dtype, and on CUDA the
prefill FLOP/s as a share of the device's bf16 peak. `--prefetch_check` times one batch size with
and without the image prefetch; `--agreement` compares answers at batch 1 against the largest
batch, and with the shared prefill against plain `generate` (equal on CPU in float32; on CUDA in
bf16 near-ties may flip).
"""

from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()  # before torch is imported (lever_lm.process)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from lever_lm.demo import real_size  # noqa: E402
from lever_lm.vqa.backends.base import default_dtype  # noqa: E402
from lever_lm.vqa.prompts import FewShotPrompt, Shot  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment; --peak_tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0}  # fmt: skip


@dataclass
class ForwardTimes:
    """Every model forward of a run, split into prefill (many tokens per row) and decode (one)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_flops: float = 0.0
    prefill_calls: int = 0
    decode_calls: int = 0
    tower_s: float = 0.0
    tower_calls: int = 0
    shapes: list = field(default_factory=list)


def instrument(model, device: torch.device, times_ref: list[ForwardTimes]) -> None:
    """Wrap the model's forward and vision tower with synchronised timers (benchmark only)."""
    forward, tower = model.forward, model.get_image_features
    text = model.config.get_text_config()
    layer_params = sum(p.numel() for p in model.model.language_model.layers.parameters())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @functools.wraps(forward)  # generate checks its keyword arguments against forward's signature
    def timed_forward(*args, **kwargs):
        input_ids = kwargs.get("input_ids")
        sync()
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        sync()
        seconds = time.perf_counter() - start
        times = times_ref[0]
        rows, length = input_ids.shape if input_ids is not None else (0, 0)
        if length > 1:
            times.prefill_s += seconds
            times.prefill_calls += 1
            tokens = rows * length
            # matmuls of the decoder layers, plus causal attention scores and values (4 * L * n^2 * d / 2)
            attention = 2 * text.num_hidden_layers * rows * length**2 * text.hidden_size
            times.prefill_flops += 2 * layer_params * tokens + attention
            times.shapes.append((rows, length))
        else:
            times.decode_s += seconds
            times.decode_calls += 1
        return out

    @functools.wraps(tower)
    def timed_tower(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = tower(*args, **kwargs)
        sync()
        times_ref[0].tower_s += time.perf_counter() - start
        times_ref[0].tower_calls += 1
        return out

    model.forward = timed_forward
    model.get_image_features = timed_tower


def workload(photos: list[Path], queries: int, candidates: int, seed: int) -> list[list[FewShotPrompt]]:
    """Per query, `candidates` two-shot prompts: its own photo, ICDs from a shortlist of 8."""
    rng = random.Random(seed)
    out = []
    for query_photo in rng.sample(photos, queries):
        question = real_size.synthetic_question(rng)[0]
        shortlist = rng.sample([p for p in photos if p != query_photo], 8)
        icds = {path: real_size.synthetic_question(rng) for path in shortlist}
        block = []
        for _ in range(candidates):
            shots = tuple(Shot(path, *icds[path]) for path in rng.sample(shortlist, 2))
            block.append(FewShotPrompt(shots, Shot(query_photo, question)))
        out.append(block)
    return out


def score(backend, blocks: list[list[FewShotPrompt]], prefetch: bool = True) -> tuple[float, list]:
    """As the generator does per block: prefetch, then generate; seconds and the answers."""
    backend.image_cache.clear()
    start = time.perf_counter()
    answers = []
    for block in blocks:
        if prefetch:
            backend.prefetch(block)
        answers += backend.generate(block)
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    seconds = time.perf_counter() - start
    failed = [g.error for g in answers if g.error]
    if failed:
        raise SystemExit(f"{len(failed)} prompts failed, e.g. {failed[0]}")
    return seconds, [g.raw for g in answers]


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA max allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS (process)"


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="default: bfloat16 on a GPU with native bf16, float32 on CPU")
    parser.add_argument("--layers", type=int, help="LM layers (default: all 36)")
    parser.add_argument("--vision_layers", type=int, help="vision blocks (default: all 32)")
    parser.add_argument(
        "--narrow", action="store_true", help="narrow widths (lever_lm.demo.real_size): a smoke run of the script"
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--queries", type=int, default=13, help="queries per timed run")
    parser.add_argument("--candidates", type=int, default=10, help="candidates per query")
    parser.add_argument("--photos", type=int, default=256, help="distinct 640x480 photos")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--prefetch_check", type=int, metavar="BATCH", help="time this batch size without prefetch too")
    parser.add_argument("--agreement", action="store_true", help="answers: batch 1 vs largest, shared prefill vs not")
    parser.add_argument("--peak_tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--photo_dir", type=Path, help="where to keep the photos (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = run(args, args.photo_dir or Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def run(args, photo_dir: Path) -> dict:
    device = torch.device(args.device)
    dtype = default_dtype(device, args.dtype)
    results: dict = {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        results["device_name"] = torch.cuda.get_device_name(device)
    else:
        results["device_name"] = platform.processor() or platform.machine()
    print(f"machine: {results['device_name']}, torch {torch.__version__} ({torch.get_num_threads()} CPU threads), "
          f"python {platform.python_version()}")  # fmt: skip

    started = time.perf_counter()
    processor = real_size.build_processor()
    config = real_size.qwen2_5_vl_3b_config(
        real_size.token_ids(processor), layers=args.layers, vision_layers=args.vision_layers, narrow=args.narrow
    )
    model = real_size.build_random_model(config, dtype, device, seed=args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    text, vision = config.text_config, config.vision_config
    results["model"] = {"parameters": parameters, "layers": text.num_hidden_layers, "vision_layers": vision.depth,
                        "hidden": text.hidden_size, "vision_hidden": vision.hidden_size}  # fmt: skip
    print(f"model: Qwen2.5-VL-3B architecture, {text.num_hidden_layers}/36 LM layers, {vision.depth}/32 vision "
          f"blocks, {'narrow' if args.narrow else 'full'} width, {parameters / 1e9:.2f}B parameters, {results['dtype']}, random weights "
          f"(built in {time.perf_counter() - started:.1f} s)")  # fmt: skip

    photos = real_size.write_photos(photo_dir, args.photos, seed=args.seed)
    blocks = workload(photos, args.queries, args.candidates, args.seed)
    prompts = [p for block in blocks for p in block]
    generation = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 3, "length_penalty": 0.0, "do_sample": False}
    settings = {"vqa_model": {"generation": generation, "image_cache_mb": 4096}}
    backend = real_size.random_weight_backend(model, processor, device, config=settings, batch_size=1)
    times_ref = [ForwardTimes()]
    instrument(model, device, times_ref)

    # Sizes: tokens per image and per prompt, as the backend builds them.
    warm = backend._encode([backend._prepare(p) for p in prompts[:1]])  # also warms up the kernels
    image = backend.image_cache.get(prompts[0].query.image)
    encoded = [backend._encode([backend._prepare(p)])["input_ids"].shape[1] for p in prompts[:20]]
    visual = 3 * image.num_tokens
    results["tokens"] = {"visual_per_image": image.num_tokens, "grid_thw": image.grid_thw.tolist()[0],
                         "prompt_mean": statistics.mean(encoded), "prompt_min": min(encoded),
                         "prompt_max": max(encoded), "text_mean": statistics.mean(encoded) - visual}  # fmt: skip
    print(f"tokens: {image.num_tokens} visual tokens per 640x480 photo (grid {image.grid_thw.tolist()[0]}); "
          f"prompt {min(encoded)}-{max(encoded)} tokens (mean {statistics.mean(encoded):.0f}, of which "
          f"{statistics.mean(encoded) - visual:.0f} text), {len(warm['input_ids'][0])} for the first")  # fmt: skip
    distinct = len({path for p in prompts for path in p.images})
    print(f"workload: {args.queries} queries x {args.candidates} candidates = {len(prompts)} prompts, "
          f"{distinct} distinct photos, 3 beams, 5 new tokens (forced)")  # fmt: skip

    per_batch = {}
    for size in args.batch_sizes:
        set_batch_size(backend, size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times_ref[0] = ForwardTimes()
        seconds, answers = score(backend, blocks)
        t = times_ref[0]
        row = {"seconds": seconds, "candidates_per_s": len(prompts) / seconds, "prefill_s": t.prefill_s,
               "decode_s": t.decode_s, "tower_s": t.tower_s, "images": t.tower_calls,
               "prepare_cpu_s": backend.work.prepare_s, "peak_memory": peak_memory(device), "answers": answers}  # fmt: skip
        peak = device_peak_tflops(device, args.peak_tflops)
        if t.prefill_s > 0:
            row["prefill_tflops"] = t.prefill_flops / t.prefill_s / 1e12
            if peak and dtype == torch.bfloat16:
                row["prefill_share_of_peak"] = row["prefill_tflops"] / peak
        per_batch[size] = row
        share = f", {row['prefill_share_of_peak']:.0%} of {peak:.0f}" if "prefill_share_of_peak" in row else ""
        print(f"batch {size:3d}: {row['candidates_per_s']:8.2f} candidates/s ({seconds:.1f} s); prefill "
              f"{t.prefill_s:.1f} s ({row.get('prefill_tflops', 0):.2f} TFLOP/s{share}), decode {t.decode_s:.1f} s, "
              f"tower {t.tower_s:.1f} s for {t.tower_calls} photos ({1e3 * t.tower_s / max(t.tower_calls, 1):.0f} "
              f"ms each), processor {backend.work.prepare_s:.1f} s CPU; {row['peak_memory']}")  # fmt: skip
    base = per_batch[args.batch_sizes[0]]["candidates_per_s"]
    for size, row in per_batch.items():
        row["speedup_vs_first"] = row["candidates_per_s"] / base
    print("speed-up over batch", args.batch_sizes[0], ":",
          ", ".join(f"batch {s}: {r['speedup_vs_first']:.1f}x" for s, r in per_batch.items()))  # fmt: skip
    results["batches"] = {str(s): {k: v for k, v in r.items() if k != "answers"} for s, r in per_batch.items()}

    if args.prefetch_check:
        size = args.prefetch_check
        set_batch_size(backend, size)
        without, _ = score(backend, blocks, prefetch=False)
        with_prefetch, _ = score(backend, blocks, prefetch=True)
        results["prefetch"] = {"batch": size, "without_s": without, "with_s": with_prefetch}
        print(f"prefetch (batch {size}): {without:.1f} s without, {with_prefetch:.1f} s with "
              f"({without / with_prefetch:.2f}x)")  # fmt: skip

    if args.agreement:
        largest, first = max(per_batch), min(per_batch)
        results["agreement"] = {
            f"batch_{first}_vs_{largest}": _agreement(per_batch[first]["answers"], per_batch[largest]["answers"])
        }
        backend.share_prefill = False
        _, plain = score(backend, blocks)
        backend.share_prefill = True
        results["agreement"]["shared_prefill_vs_plain"] = _agreement(per_batch[largest]["answers"], plain)
        print("agreement of answers:", ", ".join(f"{k}: {v:.1%}" for k, v in results["agreement"].items()))
    results["peak_memory"] = peak_memory(device)
    print("peak memory:", results["peak_memory"])
    return results


def set_batch_size(backend, size: int) -> None:
    backend.settings = dataclasses.replace(backend.settings, batch_size=size)
    backend.batch_runner.batch_size = size


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


if __name__ == "__main__":
    main()
