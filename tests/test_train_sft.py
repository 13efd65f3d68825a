"""Pointer SFT on beam data (teacher forcing): it learns, deterministically, and writes a loadable checkpoint."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lever_lm.data.beam_data import load_beam_data, save_beam_data
from lever_lm.data.vqa import VQADataset
from lever_lm.demo.dataset import Split
from lever_lm.embeddings.export import export_embeddings
from lever_lm.errors import InputError
from lever_lm.models.v2 import train_sft
from lever_lm.models.v2.checkpoint import load_pointer_checkpoint
from lever_lm.models.v2.train_sft import beam_examples, sft_loss, train_pointer_sft

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
        train, embeddings, epochs=8, **SETTINGS, on_epoch_end=lambda e, loss: losses.append(loss)
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


def test_cli_writes_a_loadable_lightning_checkpoint(demo, tmp_path):
    dataset, embeddings, _, paths, root = demo
    out = tmp_path / "sft.ckpt"
    args = ["--beam_data", str(paths["train"]), "--emb", str(root / "emb.pt"), "--out", str(out)]
    train_sft.main([*args, "--hidden_dim", "32", "--epochs", "2", "--lr", "3e-3", "--no-use_gate"])
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
