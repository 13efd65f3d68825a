"""Shared fixtures: the demo data set and tiny models, built once per test session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Content digests are cached per test session, never in the user's cache (subprocesses inherit it).
os.environ["LEVER_LM_CACHE_DIR"] = __import__("tempfile").mkdtemp(prefix="lever_lm_digests_")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lever_lm.demo.build import build_demo  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules running tiny models: extra intra-op threads only spin on such small matrices,
    and on a shared 2-core machine they made these tests up to 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A freshly built demo (seed 0): `vqa/` data set and `models/` tiny CLIP and Qwen2.5-VL."""
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, seed=0)
    return out


@dataclass(frozen=True)
class RLInputs:
    """Everything the RL generator reads, built from the demo: embeddings, beam data, SFT checkpoint."""

    demo: Path
    query_emb: Path
    cand_emb: Path
    beam_data: Path
    sft_ckpt: Path

    @property
    def vqa(self) -> Path:
        return self.demo / "vqa"

    @property
    def sampler_cache(self) -> Path:
        """The pools the beam data was searched over."""
        return self.beam_data.with_name("pools.json")

    @property
    def vlm(self) -> Path:
        return self.demo / "models" / "qwen2.5-vl-tiny"

    def dataset_flags(self) -> list[str]:
        return [
            "--train_ques_path", str(self.vqa / "OpenEnded_mscoco_train2014_questions.json"),
            "--train_ann_path", str(self.vqa / "mscoco_train2014_annotations.json"),
            "--train_image_root", str(self.vqa / "mscoco2014" / "train2014"),
        ]  # fmt: skip

    def generator_argv(self, output: Path, *extra: str) -> list[str]:
        """The generator's flags for these inputs with few candidates per query (2 beams, 1 sample, 1 random)."""
        return [
            "--sft_ckpt", str(self.sft_ckpt), "--beam_data", str(self.beam_data), "--output_path", str(output),
            "--query_emb", str(self.query_emb), "--cand_emb", str(self.cand_emb), "--vqa_model_path", str(self.vlm),
            *self.dataset_flags(), "--num_beams", "2", "--temps", "1.0", "--num_samples_per_temp", "1",
            "--num_random", "1", "--device", "cpu", "--no_progress", *extra,
        ]  # fmt: skip

    def dataset_paths(self):
        from lever_lm.data.dataset_paths import DatasetPaths

        vqa = self.vqa
        return DatasetPaths(
            vqa / "OpenEnded_mscoco_train2014_questions.json",
            vqa / "mscoco_train2014_annotations.json",
            vqa / "mscoco2014" / "train2014",
        )


@pytest.fixture(scope="session")
def rl_inputs(demo_dir: Path, tmp_path_factory) -> RLInputs:
    """Demo embeddings (tiny CLIP), 12 queries of InfoScore beam data over random pools of 8 (scored by the
    tiny VLM), a briefly trained SFT pointer."""
    from lever_lm.data.beam_data import load_beam_data
    from lever_lm.data.dataset_paths import DatasetPaths
    from lever_lm.data.embeddings import save_embeddings
    from lever_lm.embeddings.export import export_embeddings
    from lever_lm.infoscore.generate import BeamDataRequest, run_beam_data
    from lever_lm.models.v2.checkpoint import save_pointer_checkpoint
    from lever_lm.models.v2.train_sft import train_pointer_sft
    from lever_lm.models.v3.pools import save_sampler_cache
    from lever_lm.models.v3.samplers import draw_queries, sample_pools

    out = tmp_path_factory.mktemp("rl_inputs")
    vqa = demo_dir / "vqa"
    paths = DatasetPaths(
        vqa / "OpenEnded_mscoco_train2014_questions.json",
        vqa / "mscoco_train2014_annotations.json",
        vqa / "mscoco2014" / "train2014",
    )
    dataset = paths.load()
    embeddings = export_embeddings(dataset, demo_dir / "models" / "clip-tiny", batch_size=64, progress=False)
    save_embeddings(embeddings, out / "query_embeddings.pt")
    save_embeddings(embeddings, out / "candidate_embeddings.pt")
    pools = sample_pools("rand", draw_queries(len(dataset), 12, seed=0), dataset.image_ids, pool_size=8)
    save_sampler_cache(pools, out / "pools.json")
    vlm = str(demo_dir / "models" / "qwen2.5-vl-tiny")
    request = BeamDataRequest(
        sampler_cache=out / "pools.json", output_path=out / "beam.json", dataset=paths, vqa_model_path=vlm,
        device="cpu", progress=False,
    )  # fmt: skip
    run_beam_data(request)
    beam = load_beam_data(out / "beam.json", len(dataset))
    model = train_pointer_sft(
        beam, embeddings, hidden_dim=32, num_layers=1, use_gate=True, epochs=5, lr=3e-3, batch_size=32, seed=0
    )
    save_pointer_checkpoint(model, out / "sft.ckpt")
    return RLInputs(
        demo_dir, out / "query_embeddings.pt", out / "candidate_embeddings.pt", out / "beam.json", out / "sft.ckpt"
    )
