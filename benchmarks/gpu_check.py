"""The GPU check: real size on a real accelerator, in one go (run by `benchmarks/gpu_check.sh`).

    python benchmarks/gpu_check.py all --work /tmp/gpu_check --out $OUT        # every step, in order
    python benchmarks/gpu_check.py bench|prepare|generate|resume|drill ...     # one step

Steps (each appends its figures to OUT/gpu_check.json as soon as it ends, so a time-out keeps
what finished):
- bench: `bench_real_size.py` with the whole model in bf16, batch sizes 1-64, the prefetch
  comparison and the answer agreement (batch 1 against 64; shared prefill against plain generate);
- prepare: a synthetic data set of OK-VQA's size (9,009 questions, one 640x480 photo file each),
  random embeddings, beam data for 64 queries, a random SFT pointer, and the full-size random
  Qwen2.5-VL-3B saved as a model directory;
- generate: the RL generator on it, end to end (`--device cuda:0`, default batch size and cache);
- resume: the same run killed (SIGKILL) in its second block of 32 queries, then resumed: the final
  JSON must be byte-identical to the uninterrupted run's (the answers that differ are counted);
- drill: a device-side assert injected into a batch (an out-of-range token id): the backend must
  stop with AcceleratorFailure rather than fail the candidates one by one.
"""

from __future__ import annotations

from lever_lm.process import apply_process_settings

apply_process_settings()  # before torch is imported (lever_lm.process)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ITEMS, QUERIES, EMBEDDING_DIM = 9009, 64, 512
KILL_AFTER_LINES = 40  # journal lines: inside the second block of 32


def record(out: Path, step: str, figures: dict) -> None:
    path = out / "gpu_check.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[step] = figures
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"== {step}: {json.dumps(figures)[:2000]}", flush=True)


def step_bench(args) -> None:
    work, out = args.work, args.out
    started = time.time()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_real_size.py"), "--device", args.device,
           "--batch_sizes", "1", "8", "16", "32", "64", "--queries", "13", "--candidates", "10",
           "--prefetch_check", "32", "--agreement", "--photo_dir", str(work / "bench_photos"),
           "--json", str(out / "bench_real_size.json")]  # fmt: skip
    completed = subprocess.run(cmd, cwd=ROOT)
    figures = json.loads((out / "bench_real_size.json").read_text()) if completed.returncode == 0 else {}
    record(out, "bench", {"returncode": completed.returncode, "seconds": time.time() - started, **figures})


def step_prepare(args) -> None:
    work, out = args.work, args.out
    import torch
    from bench_ray_engine import random_beam_data  # benchmarks/ is on the path when run as a script

    from lever_lm.data.beam_data import save_beam_data
    from lever_lm.data.embeddings import save_embeddings
    from lever_lm.data.vqa import VQADataset
    from lever_lm.demo import real_size
    from lever_lm.models.v2.checkpoint import save_pointer_checkpoint
    from lever_lm.models.v2.pointer_selector import PointerSelectorV2

    started = time.time()
    files = real_size.write_okvqa_size_dataset(work / "vqa", items=args.items)
    dataset = VQADataset.load(files["questions"], files["annotations"], files["images"])
    seeded = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(args.items, EMBEDDING_DIM, generator=seeded), dim=-1)
    save_embeddings(embeddings, work / "emb.pt")
    save_beam_data(random_beam_data(dataset.image_ids, args.queries), work / "beam.json")
    torch.manual_seed(0)
    pointer = PointerSelectorV2(EMBEDDING_DIM, hidden_dim=256, num_layers=1, use_gate=True)
    save_pointer_checkpoint(pointer, work / "sft.ckpt")
    data_s = time.time() - started
    processor = real_size.build_processor()
    config = real_size.qwen2_5_vl_3b_config(real_size.token_ids(processor), narrow=args.narrow)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = real_size.build_random_model(config, dtype, args.device)
    real_size.save_model_dir(work / "model", model, processor)
    record(out, "prepare", {"data_seconds": data_s, "model_seconds": time.time() - started - data_s,
                            "items": len(dataset), "parameters": sum(p.numel() for p in model.parameters())})  # fmt: skip


def generator_cmd(args, output: Path) -> list[str]:
    work = args.work
    vqa = work / "vqa"
    return [sys.executable, "-m", "lever_lm.models.v3.generate_rl_data",
            "--sft_ckpt", str(work / "sft.ckpt"), "--beam_data", str(work / "beam.json"), "--output_path", str(output),
            "--query_emb", str(work / "emb.pt"), "--cand_emb", str(work / "emb.pt"),
            "--vqa_model", "qwen2.5_vl_3B", "--vqa_model_path", str(work / "model"),
            "--train_ques_path", str(vqa / "OpenEnded_mscoco_train2014_questions.json"),
            "--train_ann_path", str(vqa / "mscoco_train2014_annotations.json"),
            "--train_image_root", str(vqa / "mscoco2014" / "train2014"),
            "--device", args.device, "--no_progress"]  # fmt: skip


def step_generate(args) -> None:
    work, out = args.work, args.out
    output = work / "fresh" / "rl.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / "generate.log", "w") as log:
        completed = subprocess.run(generator_cmd(args, output), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    figures = {"returncode": completed.returncode, "seconds": time.time() - started}
    meta = output.with_name("rl.json.meta.json")
    if meta.exists():
        data = json.loads(meta.read_text())
        figures.update(counts=data.get("counts"), timing=data.get("timing"))
        candidates = data.get("timing", {}).get("candidates_processed_this_run", 0)
        figures["candidates_per_s_whole_run"] = candidates / figures["seconds"]
    record(out, "generate", figures)


def step_resume(args) -> None:
    work, out = args.work, args.out
    reference = work / "fresh" / "rl.json"
    output = work / "resumed" / "rl.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(out / "resume.log", "w") as log:
        process = subprocess.Popen(generator_cmd(args, output), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        lines = 0
        while process.poll() is None:
            journals = list(output.with_name("rl.json.journal").glob("*/shard-0-of-1.jsonl"))
            lines = journals[0].read_bytes().count(b"\n") if journals else 0
            if lines >= args.kill_after:
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait()
        completed = subprocess.run(generator_cmd(args, output), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    figures = {"killed_at_journal_lines": lines, "returncode": completed.returncode, "seconds": time.time() - started}
    if output.exists() and reference.exists():
        figures["byte_identical"] = output.read_bytes() == reference.read_bytes()
        a, b = json.loads(reference.read_text()), json.loads(output.read_text())
        pairs = [
            (x, y) for q in a for x, y in zip(a[q]["pointer_candidates"], b.get(q, {}).get("pointer_candidates", []))
        ]
        figures["candidates"] = len(pairs)
        figures["answers_differing"] = sum(x["vqa_raw_generation"] != y["vqa_raw_generation"] for x, y in pairs)
    record(out, "resume", figures)


def step_drill(args) -> None:
    """In a child process: the CUDA context is broken afterwards."""
    cmd = [sys.executable, __file__, "drill_child", "--work", str(args.work), "--out", str(args.out)]
    completed = subprocess.run([*cmd, "--device", args.device], cwd=ROOT)
    if completed.returncode != 0:
        record(args.out, "drill", {"returncode": completed.returncode, "passed": False})


def drill_child(args) -> None:
    work, out = args.work, args.out
    import torch

    from lever_lm.demo import real_size
    from lever_lm.vqa.backends.base import AcceleratorFailure
    from lever_lm.vqa.prompts import FewShotPrompt, Shot

    processor = real_size.build_processor()
    model = real_size.build_random_model(
        real_size.qwen2_5_vl_3b_config(real_size.token_ids(processor), narrow=True), torch.bfloat16, args.device
    )
    backend = real_size.random_weight_backend(model, processor, args.device, batch_size=4)
    photos = real_size.write_photos(work / "drill_photos", 4)
    prompts = [
        FewShotPrompt((Shot(photos[i], "What is it?", "a dog"),), Shot(photos[i + 1], "What?")) for i in range(3)
    ]
    real_encode, calls = backend._encode, []

    def poisoned(batch):
        calls.append(len(batch))
        inputs = real_encode(batch)
        inputs["input_ids"][0, 0] = model.config.text_config.vocab_size + 5  # out of range: a device-side assert
        return inputs

    backend._encode = poisoned
    try:
        backend.generate(prompts)
        outcome = {"passed": False, "why": "generate returned"}
    except AcceleratorFailure as error:
        outcome = {"passed": calls == [3], "calls": calls, "error": str(error)[:300]}
    except Exception as error:  # noqa: BLE001 -- the drill reports whatever else happened
        outcome = {"passed": False, "error": f"{type(error).__name__}: {str(error)[:300]}", "calls": calls}
    record(out, "drill", outcome)


STEPS = {"bench": step_bench, "prepare": step_prepare, "generate": step_generate, "resume": step_resume,
         "drill": step_drill}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=[*STEPS, "all", "drill_child"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check_out")))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--items", type=int, default=ITEMS, help="data set size (OK-VQA's training set: 9,009)")
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument(
        "--kill_after", type=int, default=KILL_AFTER_LINES, help="resume: kill at this many journal lines"
    )
    parser.add_argument("--narrow", action="store_true", help="narrow widths: a smoke test of the script on a CPU")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if args.step == "drill_child":
        drill_child(args)
        return
    for name in STEPS if args.step == "all" else [args.step]:
        started = time.time()
        print(f"== {name} ...", flush=True)
        STEPS[name](args)
        print(f"== {name} took {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
