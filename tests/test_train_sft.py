"""The demo's SFT pipeline: deterministic beam data from the demo set, then pointer training on it."""

from __future__ import annotations

import json

import pytest
import torch

from lever_lm.data.beam_data import load_beam_data, save_beam_data
from lever_lm.data.vqa import VQADataset
from lever_lm.demo import beam_data as demo_beam
from lever_lm.demo.beam_data import build_demo_beam_data
from lever_lm.demo.dataset import Split
from lever_lm.embeddings.export import export_embeddings
from lever_lm.errors import InputError
from lever_lm.models.v2 import train_sft
from lever_lm.models.v2.checkpoint import load_pointer_checkpoint
from lever_lm.models.v2.train_sft import beam_examples, sft_loss, train_pointer_sft

SETTINGS = dict(hidden_dim=32, num_layers=1, use_gate=True, lr=3e-3, batch_size=32, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(demo_dir, tmp_path_factory):
    """The demo training split, its tiny-CLIP embeddings, and beam data for 128 queries (saved)."""
    split = Split("train", demo_dir / "vqa")
    dataset = VQADataset.load(split.questions_path, split.annotations_path, split.image_root)
    embeddings = export_embeddings(dataset, demo_dir / "models" / "clip-tiny", progress=False)
    data = build_demo_beam_data(dataset, embeddings, num_queries=128, seed=0)
    root = tmp_path_factory.mktemp("sft")
    keys = list(data)
    paths = {}
    for name, part in (("all", keys), ("train", keys[::2]), ("held_out", keys[1::2])):
        paths[name] = root / f"{name}.json"
        save_beam_data({k: data[k] for k in part}, paths[name])
    torch.save(embeddings, root / "emb.pt")
    return dataset, embeddings, data, paths, root


def test_demo_beam_data_format_and_determinism(demo):
    dataset, embeddings, data, paths, _ = demo
    assert build_demo_beam_data(dataset, embeddings, num_queries=128, seed=0) == data
    assert list(build_demo_beam_data(dataset, embeddings, num_queries=128, seed=1)) != list(data)
    beam = load_beam_data(paths["all"], num_items=len(dataset))
    assert beam.query_ids == sorted(beam.query_ids) and len(beam.query_ids) == 128 and beam.shot_num == 2
    for query in beam.query_ids:
        sequences = beam.icd_sequences(query)
        assert len(sequences) == 5 and len({tuple(s) for s in sequences}) == 5
        assert all(query not in s and len(set(s)) == 2 for s in sequences)
        best = sequences[0]  # the best beam's ICDs ask the same kind of question as the query
        assert all(dataset[i].question_type == dataset[query].question_type for i in best)


def test_demo_beam_scores_follow_the_documented_gain(demo):
    dataset, embeddings, data, _, _ = demo
    emb = torch.nn.functional.normalize(embeddings, dim=-1)
    cosine = emb @ emb.T
    types = [dataset[i].question_type for i in range(len(dataset))]
    for key in list(data)[:3]:
        query = int(key)
        same = torch.tensor([float(t == types[query]) for t in types])
        first = same + cosine[query]  # gain of c as the first ICD
        second = first.view(1, -1) - demo_beam.REDUNDANCY_PENALTY * cosine  # [x, y]: gain of y after x
        (a, b, _), last_gain = data[key]["id_list"][0], data[key]["score_list"][0]
        assert last_gain == pytest.approx(float(second[a, b]), abs=1e-5)
        # the best beam is the best pair under the summed gain (exhaustive check over all pairs)
        total = first.view(-1, 1) + second
        total.fill_diagonal_(float("-inf"))
        total[query, :] = total[:, query] = float("-inf")
        assert float(total[a, b]) == pytest.approx(float(total.max()), abs=1e-5)


def test_training_lowers_the_loss_and_ranks_held_out_beam_icds_far_above_chance(demo):
    dataset, embeddings, _, paths, _ = demo
    train = load_beam_data(paths["train"], num_items=len(dataset))
    held_out = load_beam_data(paths["held_out"], num_items=len(dataset))
    queries, labels = beam_examples(train)
    untrained = train_pointer_sft(train, embeddings, epochs=0, **SETTINGS)
    losses = []
    trained = train_pointer_sft(train, embeddings, epochs=8, **SETTINGS, on_epoch_end=lambda e, loss: losses.append(loss))
    with torch.no_grad():
        before = sft_loss(untrained, queries, labels, embeddings).item()
        after = sft_loss(trained, queries, labels, embeddings).item()
    assert after < 0.6 * before and losses[-1] < losses[0]
    # rank of each held-out beam's first ICD in the first-step distribution (chance: ~K/2 = 137)
    qs = torch.tensor(held_out.query_ids)
    with torch.no_grad():
        pool = trained.encode_pool(embeddings)
        log_probs = trained.next_log_probs(trained.encode_queries(embeddings[qs], pool, exclude=qs), pool, qs.view(-1, 1))
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


def test_demo_beam_data_cli(demo, demo_dir, tmp_path):
    dataset, _, data, _, root = demo
    split = Split("train", demo_dir / "vqa")
    out = tmp_path / "beam.json"
    demo_beam.main(
        [
            "--train_ques_path", str(split.questions_path),
            "--train_ann_path", str(split.annotations_path),
            "--train_image_root", str(split.image_root),
            "--emb", str(root / "emb.pt"), "--out", str(out), "--num_queries", "128",
        ]
    )  # fmt: skip
    assert json.loads(out.read_text()) == data
