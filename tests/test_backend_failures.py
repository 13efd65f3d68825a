"""What is not a prompt's fault never fails a candidate: out of memory, broken accelerators, failing batches.

Errors are injected into the demo's tiny Qwen2.5-VL (its generate calls and its vision tower).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lever_lm.demo.dataset import Split
from lever_lm.demo.real_size import qwen2_5_vl_3b_config
from lever_lm.errors import InputError
from lever_lm.models.v3 import generate_rl_data
from lever_lm.rl import generate
from lever_lm.vqa.backends import base, describe_settings, load_backend, memory
from lever_lm.vqa.backends.base import (
    AcceleratorFailure,
    BatchRunner,
    DeviceOutOfMemory,
    Failed,
    RepeatedBatchFailures,
)
from lever_lm.vqa.backends.image_text_to_text import attn_implementation
from lever_lm.vqa.images import nbytes
from lever_lm.vqa.model_config import resolve_settings
from lever_lm.vqa.prompts import FewShotPrompt, Shot

CONFIG = {"vqa_model": {"system_prompt": "You are a helpful assistant. Answer the question about the image."}}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(demo_dir) -> Path:
    return demo_dir / "models" / "qwen2.5-vl-tiny"


@pytest.fixture(scope="module")
def prompts(demo_dir) -> list[FewShotPrompt]:
    """Twelve two-shot demo prompts over 8 distinct images."""
    split = Split("train", demo_dir / "vqa")
    questions = json.loads(split.questions_path.read_text(encoding="utf-8"))["questions"][:8]
    rng = random.Random(1)
    out = []
    for k in range(12):
        query, *icds = rng.sample(questions, 3)
        shots = tuple(Shot(split.image_path(q["image_id"]), q["question"], "yes") for q in icds)
        out.append(FewShotPrompt(shots, Shot(split.image_path(query["image_id"]), query["question"])))
    return out


def fresh_backend(model_dir, batch_size=8, **settings):
    config = {"vqa_model": {**CONFIG["vqa_model"], **settings}}
    return load_backend("qwen2.5_vl_3B", model_path=str(model_dir), config=config, batch_size=batch_size)


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    return fresh_backend(model_dir).generate(prompts)


def test_out_of_memory_halves_the_batch_keeps_the_size_and_changes_no_answer(model_dir, prompts, reference, caplog):
    backend = fresh_backend(model_dir, batch_size=8)
    real, sizes = backend._generate_texts, []

    def needs_small_batches(batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (simulated)")
        return real(batch)

    backend._generate_texts = needs_small_batches
    with caplog.at_level(logging.WARNING):
        assert backend.generate(prompts) == reference
    assert all(g.error is None for g in reference)
    assert backend.batch_runner.batch_size == 2
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}, "halved, then the smaller size for the rest"
    reductions = [r.message for r in caplog.records if "for the rest of the run" in r.message]
    assert len(reductions) == 2 and "using 2 per batch" in reductions[-1]


def test_out_of_memory_with_one_prompt_stops_the_run_naming_the_settings(model_dir, prompts):
    backend = fresh_backend(model_dir, batch_size=4)

    def no_memory(batch):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    backend._generate_texts = no_memory
    with pytest.raises(DeviceOutOfMemory) as caught:
        backend.generate(prompts[:4])
    assert isinstance(caught.value, InputError), "a one-line 'error:' from the command line, exit 2"
    message = str(caught.value)
    assert "vqa_model.image_cache_mb" in message and "--batch_size is already down to 1" in message
    assert "CUDA out of memory (simulated)" in message


@pytest.mark.parametrize(
    "error",
    [
        torch.AcceleratorError("CUDA error: device-side assert triggered"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: uncorrectable ECC error encountered"),
    ],
    ids=["AcceleratorError", "illegal-access", "ecc"],
)
def test_an_accelerator_failure_in_generate_stops_at_once(model_dir, prompts, error):
    backend = fresh_backend(model_dir, batch_size=4)
    calls = []

    def broken(batch):
        calls.append(len(batch))
        raise error

    backend._generate_texts = broken
    with pytest.raises(AcceleratorFailure, match="the accelerator failed") as caught:
        backend.generate(prompts)
    assert calls == [4], "no retries, no later batches"
    assert caught.value.__cause__ is error


def test_an_accelerator_failure_in_the_vision_tower_stops_at_once(model_dir, prompts, monkeypatch):
    backend = fresh_backend(model_dir)

    def broken(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(backend.model, "get_image_features", broken)
    with pytest.raises(AcceleratorFailure):
        backend.generate(prompts[:2])
    with pytest.raises(AcceleratorFailure):
        backend.prefetch(prompts[:2])


def test_out_of_memory_in_the_vision_tower_shrinks_the_cache_and_retries(model_dir, prompts, reference, monkeypatch):
    backend = fresh_backend(model_dir, image_cache_mb=64)
    real, failures = backend.model.get_image_features, []

    def once_out_of_memory(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.model, "get_image_features", once_out_of_memory)
    assert backend.generate(prompts) == reference
    assert backend.image_cache.max_bytes == 32 * 2**20

    def always_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(backend.model, "get_image_features", always_out_of_memory)
    backend.image_cache.clear()
    with pytest.raises(DeviceOutOfMemory, match="preparing one image"):
        backend.generate(prompts[:1])


def test_the_circuit_breaker_stops_a_run_whose_batches_all_fail(model_dir, prompts):
    backend = fresh_backend(model_dir, batch_size=4)
    backend.batch_runner.min_failed_prompts = 12
    calls = []

    def always_fails(batch):
        calls.append(len(batch))
        raise ValueError("the model is broken (simulated)")

    backend._generate_texts = always_fails
    with pytest.raises(RepeatedBatchFailures, match="the model is broken") as caught:
        backend.generate(prompts + prompts)
    assert "last 3 batches (12 prompts)" in str(caught.value)
    assert len([c for c in calls if c == 4]) == 3, "stopped after the third whole batch failed"


def test_the_circuit_breaker_counts_only_unbroken_streaks_of_whole_failed_batches():
    runner = BatchRunner(torch.device("cpu"), 4, max_failed_batches=3, min_failed_prompts=8)
    for _ in range(5):  # a success in every batch resets the streak
        runner.observe(["e1", None, "e2", "e3"])
    runner.observe(["first", "x"])
    runner.observe(["y", "z"])
    runner.observe([None])
    runner.observe(["a"] * 4)
    runner.observe(["b"] * 4)
    with pytest.raises(RepeatedBatchFailures, match="first error: a"):
        runner.observe(["c"] * 4)
    small = BatchRunner(torch.device("cpu"), 1, max_failed_batches=3, min_failed_prompts=8)
    for _ in range(7):  # batch size 1: one query's ~10 candidates failing is not a broken model
        small.observe(["broken query image"])


def test_a_batch_runner_keeps_failures_as_strings():
    runner = BatchRunner(torch.device("cpu"), 3)

    def run(items):
        if 2 in items:
            raise KeyError("two")
        return [f"ok {i}" for i in items]

    assert runner.run_with_retry([1, 2, 3, 4], run) == [
        "ok 1",
        Failed("generation failed: KeyError: 'two'"),
        "ok 3",
        "ok 4",
    ]


def test_prefetch_fills_the_cache_ahead_and_changes_no_answer(model_dir, prompts, reference, tmp_path):
    backend = fresh_backend(model_dir)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    bad = FewShotPrompt(prompts[0].shots, Shot(broken, "What?"))
    backend.prefetch([*prompts, bad])
    distinct = {path for prompt in prompts for path in prompt.images}
    assert len(backend.image_cache) == len(distinct) and backend.work.prefetched == len(distinct)
    out = backend.generate([*prompts, bad])
    assert out[:-1] == reference
    assert backend.image_cache.misses == 0, "every image was ready"
    assert "broken.jpg: cannot read image" in out[-1].error
    assert backend.work.prompts == len(prompts) + 1 and backend.work.generate_s > 0
    report = backend.work.report(backend.image_cache)
    assert "hit rate 100%" in report and f"{len(distinct)} ahead of use" in report


def test_prefetch_stops_before_evicting_what_it_prepared(model_dir, prompts):
    backend = fresh_backend(model_dir)
    one_image = backend.image_cache.bytes + nbytes(backend.image_cache.get(prompts[0].query.image))
    backend.image_cache.clear()
    backend.image_cache.max_bytes = 4 * one_image
    backend.prefetch(prompts)
    assert len(backend.image_cache) == 3, "stops at 90% of the budget: a fourth would be evicted by generate's own"


def test_a_broken_gpu_stops_the_generator_and_the_journal_keeps_what_finished(rl_inputs, tmp_path, monkeypatch, capsys):
    real_load = generate.load_backend
    calls = []

    def load_then_break(*args, **kwargs):
        backend = real_load(*args, **kwargs)
        real = backend._generate_texts

        def breaks_on_the_third_call(batch):
            calls.append(len(batch))
            if len(calls) >= 3:
                raise torch.AcceleratorError("CUDA error: device-side assert triggered (simulated)")
            return real(batch)

        backend._generate_texts = breaks_on_the_third_call
        return backend

    monkeypatch.setattr(generate, "load_backend", load_then_break)
    output = tmp_path / "rl.json"
    args = [
        "--sft_ckpt", str(rl_inputs.sft_ckpt), "--beam_data", str(rl_inputs.beam_data), "--output_path", str(output),
        "--query_emb", str(rl_inputs.query_emb), "--cand_emb", str(rl_inputs.cand_emb),
        "--vqa_model_path", str(rl_inputs.vlm), *rl_inputs.dataset_flags(), "--num_beams", "2", "--temps", "1.0",
        "--num_samples_per_temp", "1", "--num_random", "1", "--device", "cpu", "--no_progress", "--batch_size", "4",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        generate_rl_data.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "error: stopped: " in err and "device-side assert" in err
    assert "a rerun resumes" in err and "Traceback" not in err
    assert not output.exists()
    journal = next((tmp_path / "rl.json.journal").glob("*/shard-0-of-1.jsonl"))
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    records = [row for row in rows if "pointer_candidates" in json.dumps(row)]
    assert records, "queries finished before the failure are journaled"
    assert 'eval_failed": true' not in journal.read_text()


def test_auto_batch_size_and_cache_from_free_memory():
    config = qwen2_5_vl_3b_config()
    model = SimpleNamespace(config=config, dtype=torch.bfloat16)
    per_prompt = memory.prompt_bytes(model, beams=3, prompt_tokens=1400)
    assert per_prompt == 1400 * (3 * 36 * 2 * 2 * 128 * 2 + 3 * 11008 * 2)  # ~0.25 GB
    sizes = [memory.auto_batch_size(gib * 2**30, model) for gib in (4, 16, 32, 72, 132)]
    assert sizes == [4, 16, 32, 64, 64]
    settings = resolve_settings("chat", None)
    assert (settings.batch_size, settings.image_cache_mb) == (None, None)
    on_cpu = memory.resolve_memory_settings(settings, model, torch.device("cpu"))
    assert (on_cpu.batch_size, on_cpu.image_cache_mb) == (16, 1024)
    given = resolve_settings("chat", {"vqa_model": {"batch_size": 8, "image_cache_mb": 10}})
    assert memory.resolve_memory_settings(given, model, torch.device("cpu")) == given


def test_bfloat16_only_where_the_gpu_computes_it(monkeypatch):
    cuda = torch.device("cuda:0")
    assert base.default_dtype(cuda) == torch.bfloat16  # described where there is no GPU (a merge): assumed modern
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert base.default_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert base.default_dtype(cuda) == torch.float16
    assert base.default_dtype(cuda, "float32") == torch.float32
    assert base.default_dtype(torch.device("cpu")) == torch.float32


def test_each_process_binds_its_own_gpu(monkeypatch):
    bound = []
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    base.bind_device(torch.device("cuda:3"))
    base.bind_device(torch.device("cpu"))
    assert bound == [torch.device("cuda:3")]


def test_the_vision_tower_can_have_its_own_attention(model_dir):
    settings = resolve_settings("chat", {"vqa_model": {"vision_attn_implementation": "eager"}})
    assert attn_implementation(settings) == {"vision_config": "eager", "text_config": None}
    assert attn_implementation(resolve_settings("chat", {"vqa_model": {"attn_implementation": "sdpa"}})) == "sdpa"
    backend = fresh_backend(model_dir, vision_attn_implementation="eager")
    assert backend.model.model.visual.config._attn_implementation == "eager"
    assert backend.model.model.language_model.config._attn_implementation == "sdpa"
    from lever_lm.vqa.backends.image_text_to_text import attention_in_use

    assert attention_in_use(backend.model) == {"text": "sdpa", "vision": "eager"}
    assert type(backend.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    described = describe_settings(
        "qwen2.5_vl_3B",
        model_path=str(model_dir),
        config={"vqa_model": {"vision_attn_implementation": "eager"}},
        device="cpu",
    )
    assert described["numerics"]["attn_implementation"] == {"vision_config": "eager", "text_config": None}
