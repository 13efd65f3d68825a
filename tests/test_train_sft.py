"""Pointer SFT on beam data (teacher forcing): it learns, deterministically, and writes a loadable checkpoint."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lever_lm.data.beam_data import load_beam_data, save_beam_data
from lever_lm.data.dataset_paths import DatasetPaths
from lever_lm.data.vqa import VQADataset
from lever_lm.demo.dataset import Split
from lever_lm.embeddings.export import export_embeddings
from lever_lm.errors import InputError
from lever_lm.models.v2 import train_sft
from lever_lm.models.v2.checkpoint import load_pointer_checkpoint
from lever_lm.models.v2.train_sft import beam_examples, sft_loss, split_queries, train_pointer_sft
from lever_lm.models.v3.proposals import Proposer
from lever_lm.rl.inputs import load_inputs
from lever_lm.rl.request import GenerationRequest

SETTINGS = dict(hidden_dim=32, num_layers=1, use_gate=True, lr=3e-3, batch_size=32, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def nearest_neighbour_beams(embeddings: torch.Tensor, queries: list[int], beam_size: int = 5) -> dict:
    """Beam data with a rule a pointer can learn from embeddings: beam b = the query's nearest items b and b + 1."""
    emb = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = emb @ emb.T
    data = {}
    for query in queries:
        similarity[query, query] = float("-inf")
        nearest = torch.argsort(similarity[query], descending=True, stable=True).tolist()
        data[str(query)] = {
            "id_list": [[nearest[b], nearest[b + 1], query] for b in range(beam_size)],
            "score_list": [0.0] * beam_size,
        }
    return data


@pytest.fixture(scope="module")
def demo(demo_dir, tmp_path_factory):
    """The demo training split, its tiny-CLIP embeddings, and nearest-neighbour beam data for 128 queries (saved)."""
    split = Split("train", demo_dir / "vqa")
    dataset = VQADataset.load(split.questions_path, split.annotations_path, split.image_root)
    embeddings = export_embeddings(dataset, demo_dir / "models" / "clip-tiny", progress=False)
    data = nearest_neighbour_beams(embeddings, sorted(random.Random(0).sample(range(len(dataset)), 128)))
    root = tmp_path_factory.mktemp("sft")
    keys = list(data)
    paths = {}
    for name, part in (("all", keys), ("train", keys[::2]), ("held_out", keys[1::2])):
        paths[name] = root / f"{name}.json"
        save_beam_data({k: data[k] for k in part}, paths[name])
    torch.save(embeddings, root / "emb.pt")
    return dataset, embeddings, data, paths, root


def test_training_lowers_the_loss_and_ranks_held_out_beam_icds_far_above_chance(demo):
    dataset, embeddings, _, paths, _ = demo
    train = load_beam_data(paths["train"], num_items=len(dataset))
    held_out = load_beam_data(paths["held_out"], num_items=len(dataset))
    queries, labels = beam_examples(train)
    untrained = train_pointer_sft(train, embeddings, epochs=0, **SETTINGS)
    losses = []
    trained = train_pointer_sft(
        train, embeddings, epochs=8, **SETTINGS, on_epoch_end=lambda e, loss, held_out: losses.append(loss)
    )
    with torch.no_grad():
        before = sft_loss(untrained, queries, labels, embeddings).item()
        after = sft_loss(trained, queries, labels, embeddings).item()
    assert after < 0.6 * before and losses[-1] < losses[0]
    # rank of each held-out beam's first ICD in the first-step distribution (chance: ~K/2 = 137)
    qs = torch.tensor(held_out.query_ids)
    with torch.no_grad():
        pool = trained.encode_pool(embeddings)
        log_probs = trained.next_log_probs(
            trained.encode_queries(embeddings[qs], pool, exclude=qs), pool, qs.view(-1, 1)
        )
    ranks = []
    for row, query in enumerate(held_out.query_ids):
        order = torch.argsort(log_probs[row], descending=True).tolist()
        ranks += [order.index(ids[0]) for ids in held_out.icd_sequences(query)]
        assert order[-1] == query  # the query is never a candidate for itself
    assert sum(ranks) / len(ranks) < 15 and sum(r < 10 for r in ranks) / len(ranks) > 0.6


def test_training_is_deterministic(demo):
    dataset, embeddings, _, paths, _ = demo
    train = load_beam_data(paths["train"], num_items=len(dataset))
    a = train_pointer_sft(train, embeddings, epochs=2, **SETTINGS)
    b = train_pointer_sft(train, embeddings, epochs=2, **SETTINGS)
    for key, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[key]), key


def test_the_split_is_the_lineages_lowest_ids_train(demo):
    dataset, _, _, paths, _ = demo
    beam = load_beam_data(paths["all"], num_items=len(dataset))
    train, val = split_queries(beam, 0.9)
    ordered = sorted(beam.query_ids)
    assert train.query_ids == ordered[: int(0.9 * 128)] and val.query_ids == ordered[int(0.9 * 128) :]
    assert all(train.id_lists[q] == beam.id_lists[q] for q in train.query_ids)
    assert split_queries(beam, 1.0)[1] is None
    with pytest.raises(InputError, match="leaves none of the 128 queries"):
        split_queries(beam, 0.005)


def test_held_out_metrics_are_measured_without_changing_training(demo):
    dataset, embeddings, _, paths, _ = demo
    train, val = split_queries(load_beam_data(paths["all"], num_items=len(dataset)), 0.5)
    reports = []
    with_val = train_pointer_sft(
        train, embeddings, epochs=3, **SETTINGS, val=val, on_epoch_end=lambda *r: reports.append(r)
    )
    without = train_pointer_sft(train, embeddings, epochs=3, **SETTINGS)
    for key, tensor in without.state_dict().items():
        assert torch.equal(tensor, with_val.state_dict()[key]), key
    assert [r[0] for r in reports] == [0, 1, 2]
    queries, labels = beam_examples(val)
    with torch.no_grad():
        log_probs = with_val(embeddings[queries], embeddings, labels, exclude=queries)
    assert reports[-1][2]["loss"] == pytest.approx(float(-log_probs.gather(2, labels.unsqueeze(2)).mean()))
    assert reports[-1][2]["accuracy"] == pytest.approx(float((log_probs.argmax(2) == labels).double().mean()))
    assert reports[-1][2]["accuracy"] > 0.1  # nearest-neighbour beams generalise (chance: 1 in 273)


def test_lineage_initialisation_and_dropout_are_deterministic(demo):
    dataset, embeddings, _, paths, _ = demo
    train = load_beam_data(paths["train"], num_items=len(dataset))
    untrained = train_pointer_sft(train, embeddings, epochs=0, **{**SETTINGS, "init": "lineage"})
    eye = torch.eye(32)
    for projection in (untrained.query_proj, untrained.cand_proj):
        assert (projection.weight - eye).abs().max() < 0.06  # the identity plus N(0, 0.01) noise
    assert torch.equal(untrained.query_update_gate.bias, torch.zeros(32))
    runs = [train_pointer_sft(train, embeddings, epochs=2, **SETTINGS, dropout=0.5, init="lineage") for _ in (0, 1)]
    plain = train_pointer_sft(train, embeddings, epochs=2, **SETTINGS, init="lineage")
    for key, tensor in runs[0].state_dict().items():
        assert torch.equal(tensor, runs[1].state_dict()[key]), key
    assert not torch.equal(runs[0].cand_proj.weight, plain.cand_proj.weight)
    with pytest.raises(InputError, match="init must be 'lineage' or 'torch'"):
        train_pointer_sft(train, embeddings, epochs=0, **SETTINGS, init="xavier")


def test_the_same_seed_gives_the_same_checkpoint_bytes(demo, tmp_path):
    _, _, _, paths, root = demo
    args = ["--beam_data", str(paths["all"]), "--emb", str(root / "emb.pt"), "--hidden_dim", "32", "--epochs", "2"]
    for name in ("a", "b"):
        train_sft.main([*args, "--out", str(tmp_path / f"{name}.ckpt"), "--metrics", str(tmp_path / f"{name}.json")])
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "b.ckpt").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    metrics = json.loads((tmp_path / "a.json").read_text())
    assert set(metrics) == {"sft_train_loss", "sft_val_loss", "sft_val_acc"} and 0 <= metrics["sft_val_acc"] <= 1
    train_sft.main([*args, "--seed", "1", "--out", str(tmp_path / "c.ckpt")])
    assert (tmp_path / "c.ckpt").read_bytes() != (tmp_path / "a.ckpt").read_bytes()


def test_the_checkpoint_fits_the_lineages_grpo_trainer(demo, tmp_path):
    """Its rules (grpo_post_train.main): strip `lever_lm.` then `pointer_selector.`, keep the keys of a
    PointerSelectorV3(d, hidden 256, --num_layers, gate always), load with strict=False -- so every
    one of those keys must be present with its shape, or it silently stays random."""
    _, embeddings, _, paths, root = demo
    out = tmp_path / "sft.ckpt"
    train_sft.main(
        ["--beam_data", str(paths["all"]), "--emb", str(root / "emb.pt"), "--out", str(out), "--epochs", "1"]
    )
    state = torch.load(out, weights_only=True)["state_dict"]
    stripped = {k.removeprefix("lever_lm.").removeprefix("pointer_selector."): v for k, v in state.items()}
    d, h = embeddings.shape[1], 256
    expected = {
        "input_proj.weight": (h, d),
        "cross_attn_layers.0.in_proj_weight": (3 * h, h), "cross_attn_layers.0.in_proj_bias": (3 * h,),
        "cross_attn_layers.0.out_proj.weight": (h, h), "cross_attn_layers.0.out_proj.bias": (h,),
        "attn_norms.0.weight": (h,), "attn_norms.0.bias": (h,),
        "query_proj.weight": (h, h), "cand_proj.weight": (h, h),
        "query_update_gate.weight": (h, 2 * h), "query_update_gate.bias": (h,),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in stripped.items()} == expected


def test_the_checkpoint_loads_in_the_rl_generator(demo, demo_dir, tmp_path):
    dataset, _, _, paths, root = demo
    out = tmp_path / "sft.ckpt"
    train_sft.main(
        ["--beam_data", str(paths["all"]), "--emb", str(root / "emb.pt"), "--out", str(out), "--epochs", "1"]
    )
    split = Split("train", demo_dir / "vqa")
    request = GenerationRequest(
        sft_ckpt=out, beam_data=paths["all"], output_path=tmp_path / "rl.json", query_emb=root / "emb.pt",
        cand_emb=root / "emb.pt", dataset=DatasetPaths(split.questions_path, split.annotations_path, split.image_root),
        device="cpu",
    )  # fmt: skip
    inputs = load_inputs(request)
    saved = load_pointer_checkpoint(out)
    assert inputs.pointer.hidden_dim == 256 and inputs.pointer.use_gate
    for key, tensor in saved.state_dict().items():
        assert torch.equal(tensor, inputs.pointer.state_dict()[key]), key
    proposer = Proposer(inputs.pointer, inputs.query_emb, inputs.cand_emb, inputs.proposal, device="cpu")
    for proposals in proposer.propose(inputs.queries[:3]):
        assert proposals.candidates and all(proposals.query_idx not in c.pointer for c in proposals.candidates)


def test_cli_writes_a_loadable_lightning_checkpoint(demo, tmp_path):
    dataset, embeddings, _, paths, root = demo
    out = tmp_path / "sft.ckpt"
    args = ["--beam_data", str(paths["train"]), "--emb", str(root / "emb.pt"), "--out", str(out)]
    train_sft.main(
        [*args, "--hidden_dim", "32", "--epochs", "2", "--lr", "3e-3", "--no-use_gate", "--train_ratio", "1"]
    )
    raw = torch.load(out, weights_only=True)
    assert raw["hyper_parameters"]["epochs"] == 2
    model = load_pointer_checkpoint(out)
    assert (model.input_dim, model.hidden_dim, model.num_layers, model.use_gate) == (32, 32, 1, False)
    expected = train_pointer_sft(
        load_beam_data(paths["train"], len(dataset)), embeddings, **{**SETTINGS, "use_gate": False}, epochs=2
    )
    for key, tensor in expected.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[key]), key


def test_cli_bad_input_exits_2_with_a_message(demo, tmp_path, capsys):
    _, _, _, paths, root = demo
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"5": {"id_list": [[1, 999, 5]], "score_list": [0.0]}}))
    with pytest.raises(SystemExit) as exit_:
        train_sft.main(["--beam_data", str(bad), "--emb", str(root / "emb.pt"), "--out", str(tmp_path / "x.ckpt")])
    assert exit_.value.code == 2
    assert f"error: {bad}: query 5: id 999 is outside the data set (0..273)" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_beams_that_repeat_an_id_cannot_be_trained_on(tmp_path):
    path = tmp_path / "rep.json"
    path.write_text(json.dumps({"3": {"id_list": [[1, 1, 3]], "score_list": [0.0]}}))
    with pytest.raises(InputError, match=r"query 3: beam \[1, 1, 3\] repeats an id"):
        beam_examples(load_beam_data(path, num_items=10))
