"""Pointer checkpoints: round trips in both key layouts, with and without the gate, and loud failures."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch

from lever_lm.errors import InputError
from lever_lm.models.v2.checkpoint import POINTER_PREFIX, load_pointer_checkpoint, save_pointer_checkpoint
from lever_lm.models.v2.pointer_selector import PointerSelectorV2

ARCHITECTURES = [  # (d, h, L, gate)
    (24, 16, 1, False),
    (24, 16, 1, True),
    (24, 16, 2, True),
    (16, 16, 3, False),  # d == h: no input_proj
]


def _model(d, h, layers, gate, seed=0) -> PointerSelectorV2:
    torch.manual_seed(seed)
    return PointerSelectorV2(d, hidden_dim=h, num_layers=layers, use_gate=gate).eval()


def _same_weights(a: PointerSelectorV2, b: PointerSelectorV2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _same_step_scores(a: PointerSelectorV2, b: PointerSelectorV2, d: int) -> None:
    pool = torch.randn(12, d, generator=torch.Generator().manual_seed(1))
    queries = torch.tensor([2, 7])
    outs = []
    for model in (a, b):
        enc = model.encode_pool(pool)
        with torch.no_grad():
            state = model.encode_queries(pool[queries], enc, exclude=queries)
            first = model.next_log_probs(state, enc, queries.view(-1, 1))
            state = model.advance(state, torch.tensor([0, 1]), enc)
            second = model.next_log_probs(state, enc, torch.tensor([[2, 0], [7, 1]]))
        outs.append(torch.stack([first, second]))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("d, h, layers, gate", ARCHITECTURES)
def test_save_then_load_gives_the_same_network(tmp_path, d, h, layers, gate):
    model = _model(d, h, layers, gate)
    path = tmp_path / "sft.ckpt"
    save_pointer_checkpoint(model, path, hyper_parameters={"lr": 1e-3})
    raw = torch.load(path, weights_only=True)
    assert raw["hyper_parameters"] == {"lr": 1e-3} and "pytorch-lightning_version" in raw
    assert all(key.startswith(POINTER_PREFIX) for key in raw["state_dict"])
    assert (POINTER_PREFIX + "input_proj.weight" in raw["state_dict"]) == (d != h)
    assert (POINTER_PREFIX + "query_update_gate.weight" in raw["state_dict"]) == gate
    loaded = load_pointer_checkpoint(path)
    assert (loaded.input_dim, loaded.hidden_dim, loaded.num_layers, loaded.use_gate) == (d, h, layers, gate)
    assert not loaded.training
    _same_weights(model, loaded)
    _same_step_scores(model, loaded, d)


@pytest.mark.parametrize("gate", [False, True])
def test_old_layer_names_and_clip_keys_load(tmp_path, gate):
    """A Lever-LM style file: layer 0 as `cross_attn.*`/`attn_norm.*`, CLIP towers beside the pointer."""
    model = _model(24, 16, 1, gate)
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("cross_attn_layers.0.", "cross_attn.").replace("attn_norms.0.", "attn_norm.")
        state[POINTER_PREFIX + name] = tensor
    state["lever_lm.img_model.vision_model.embeddings.patch_embedding.weight"] = torch.ones(3, 3)
    state["lever_lm.sen_model.text_model.final_layer_norm.bias"] = torch.ones(3)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {}, "epoch": 3, "global_step": 9}, path)
    loaded = load_pointer_checkpoint(path)
    assert loaded.use_gate == gate and loaded.num_layers == 1
    _same_weights(model, loaded)


def test_bare_pointer_state_dict_loads(tmp_path):
    model = _model(24, 16, 2, True)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    _same_weights(model, load_pointer_checkpoint(tmp_path / "bare.pt"))


class NotImportableHere:  # pickled by reference to this test module, then hidden from the loader
    def __init__(self, value):
        self.value = value


def test_hyper_parameters_with_foreign_objects_still_load(tmp_path, monkeypatch):
    """Lightning pickles hyper-parameters (e.g. OmegaConf configs); only the tensors matter."""
    model = _model(24, 16, 1, True)
    path = tmp_path / "hp.ckpt"
    hparams = collections.OrderedDict(cfg=NotImportableHere(3))
    state = {POINTER_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    monkeypatch.delattr(sys.modules[__name__], "NotImportableHere")
    _same_weights(model, load_pointer_checkpoint(path))


class RunsCode:
    """Unpickling this calls `mark(path)`: what a crafted checkpoint does with `os.system`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_mark, (str(self.path),))


def _mark(path: str) -> None:
    Path(path).write_text("code ran")


@pytest.mark.parametrize("where", ["hyper_parameters", "state_dict_extra"])
def test_a_pickled_call_in_a_checkpoint_never_runs(tmp_path, where):
    model = _model(24, 16, 1, False)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    state = {POINTER_PREFIX + k: v for k, v in model.state_dict().items()}
    checkpoint = {"state_dict": state, "hyper_parameters": {"cfg": RunsCode(marker)}}
    if where == "state_dict_extra":
        checkpoint = {"state_dict": state, "callbacks": [RunsCode(marker)], "hyper_parameters": {}}
    torch.save(checkpoint, path)
    with pytest.raises(Exception):  # the plain pickle path would run it: the test's own check
        torch.load(path, weights_only=True)
    _same_weights(model, load_pointer_checkpoint(path))  # the weights load ...
    assert not marker.exists(), "unpickling ran code from the checkpoint"  # ... and nothing ran


def test_an_os_system_call_in_a_checkpoint_never_runs(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    model = _model(24, 16, 1, False)
    path = tmp_path / "evil.ckpt"
    state = {POINTER_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": Evil()}}, path)
    _same_weights(model, load_pointer_checkpoint(path))
    assert not (tmp_path / "pwned").exists()


def test_a_state_dict_that_is_itself_a_crafted_object_is_refused_without_running(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save(RunsCode(tmp_path / "pwned"), path)
    with pytest.raises(InputError, match="not a checkpoint"):
        load_pointer_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def _saved_state(tmp_path, edit) -> str:
    model = _model(24, 16, 2, True)
    state = {POINTER_PREFIX + k: v for k, v in model.state_dict().items()}
    state["lever_lm.img_model.w"] = torch.ones(1)
    edit(state)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, path)
    return str(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop(POINTER_PREFIX + "query_proj.weight"), "missing pointer keys: query_proj.weight"),
        (
            lambda s: s.pop(POINTER_PREFIX + "attn_norms.1.bias"),
            "missing pointer keys: attn_norms.1.bias",
        ),
        (
            lambda s: [s.pop(k) for k in list(s) if k.startswith(POINTER_PREFIX + "query_update_gate.bias")],
            "missing pointer keys: query_update_gate.bias",
        ),
        (lambda s: s.update({POINTER_PREFIX + "extra.weight": torch.ones(2)}), "unexpected pointer keys: extra.weight"),
        (
            lambda s: s.update({POINTER_PREFIX + "query_proj.weight": torch.ones(16, 8)}),
            r"shapes that disagree: query_proj.weight \[16, 8\] \(expected \[16, 16\]\)",
        ),
        (
            lambda s: s.update({POINTER_PREFIX + "cross_attn.in_proj_bias": torch.ones(48)}),
            "both present",
        ),
        (lambda s: s.pop(POINTER_PREFIX + "cand_proj.weight"), "cand_proj.weight' is missing"),
        (
            lambda s: [s.pop(k) for k in list(s) if k.startswith(POINTER_PREFIX)],
            "no pointer weights: no key starts with 'lever_lm.pointer_selector.'",
        ),
    ],
)
def test_bad_pointer_weights_are_listed_never_randomly_initialised(tmp_path, edit, message):
    path = _saved_state(tmp_path, edit)
    with pytest.raises(InputError, match=message) as error:
        load_pointer_checkpoint(path)
    assert error.value.path == path


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "checkpoint file not found"),
        (b"hello world", "not a checkpoint .torch.load failed"),
        (torch.ones(3), "not a checkpoint: expected a dict, found Tensor"),
        ({"state_dict": {"a": 1}}, "entries that are not tensors"),
        ({"state_dict": {}}, "no 'state_dict'"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(InputError, match=message) as error:
        load_pointer_checkpoint(path)
    assert error.value.path == str(path)


# -- a checkpoint is data: loading one changes nothing outside what it returns --------------------


def _with_pickle_prefix(clean: Path, out: Path, prefix: bytes) -> Path:
    """`clean` with `prefix` (opcodes that leave the stack as they found it) run before its own pickle."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            target.writestr(info, prefix + data[2:] if info.filename.endswith("/data.pkl") else data)
    out.write_bytes(buffer.getvalue())
    return out


def _negating_defaults_prefix() -> bytes:
    """GLOBAL torch._utils._rebuild_tensor_v2, (None, {'__defaults__': ({'neg': True},)}), BUILD, POP:
    would make every later torch.load in the process return negated tensors."""
    import pickle

    state = pickle.dumps((None, {"__defaults__": ({"neg": True},)}), 2)[2:-1]
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + state + b"b0"


# GLOBAL collections.Counter, (None, {'values': set}), BUILD, POP: would zero every token F1.
COUNTER_VALUES_PREFIX = b"\x80\x02ccollections\nCounter\nN}X\x06\x00\x00\x00valuescbuiltins\nset\ns\x86b0"


@pytest.mark.parametrize("attack", ["rebuild_defaults", "counter_values"])
def test_a_crafted_checkpoint_cannot_change_process_wide_state(tmp_path, attack):
    import torch._utils

    model = _model(24, 16, 1, True)
    state = {POINTER_PREFIX + k: v for k, v in model.state_dict().items()}
    if attack == "rebuild_defaults":  # negated on disk: the crafted defaults would flip them back on load
        state = {k: -v for k, v in state.items()}
    clean = tmp_path / "clean.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {}}, clean)
    prefix = _negating_defaults_prefix() if attack == "rebuild_defaults" else COUNTER_VALUES_PREFIX
    evil = _with_pickle_prefix(clean, tmp_path / "evil.ckpt", prefix)
    defaults = torch._utils._rebuild_tensor_v2.__defaults__
    counter = dict(collections.Counter.__dict__)

    try:
        with pytest.raises(InputError, match="BUILD on .* is not allowed in a checkpoint"):
            load_pointer_checkpoint(evil)
        assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults
        assert dict(collections.Counter.__dict__) == counter
        assert sum(collections.Counter("aab").values()) == 3
    finally:  # a failure here must not poison the rest of the session
        torch._utils._rebuild_tensor_v2.__defaults__ = defaults
        for name in set(collections.Counter.__dict__) - set(counter):
            delattr(collections.Counter, name)
    reread = torch.load(clean, weights_only=True)["state_dict"]
    assert all(torch.equal(reread[k], v) for k, v in state.items()), "a later torch.load must return the true tensors"


@pytest.mark.parametrize(
    "payload, refused",
    [
        (b"\x80\x02X\x03\x00\x00\x00abc)R0", "REDUCE"),  # a call of anything but the allowlist or a stand-in
        (b"\x80\x02cbuiltins\nprint\n)R0", None),  # an unknown global is a stand-in: calling it records only
        (b"\x80\x02ccollections\nOrderedDict\n)\x810", None),  # NEWOBJ of an allowlisted class
        (b"\x80\x02X\x03\x00\x00\x00abc)\x810", "NEWOBJ"),  # NEWOBJ of something that is not a class of the list
        (b"\x80\x02ccollections\nCounter\nN\x8c\x01xK\x01s0", "SETITEM"),  # item set on a class
        (b"\x80\x02ccollections\nOrderedDict\n(K\x01ee0", "APPENDS"),  # appended to a class
    ],
)
def test_every_opcode_that_acts_on_an_object_is_checked(tmp_path, payload, refused):
    model = _model(24, 16, 1, False)
    clean = tmp_path / "clean.ckpt"
    state = {POINTER_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": NotImportableHere(1)}}, clean)  # fallback path
    evil = _with_pickle_prefix(clean, tmp_path / "evil.ckpt", payload)
    if refused is None:
        _same_weights(model, load_pointer_checkpoint(evil))
    else:
        with pytest.raises(InputError, match=f"{refused} .* not allowed in a checkpoint"):
            load_pointer_checkpoint(evil)


# -- Lever-Plus's RL checkpoints (grpo_post_train's `.pt`) ---------------------------------------


def _rl_checkpoint(model: PointerSelectorV2, path: Path, **changes) -> Path:
    """The layout `grpo_post_train.save_checkpoint` writes: a PointerSelectorV3's state dict (bare
    names, the same weights as V2) with the epoch, phase, KL weight and metrics beside it."""
    import numpy as np

    checkpoint = {
        "epoch": 2,
        "phase": "grpo",
        "model_state_dict": dict(model.state_dict()),
        "kl_beta": 0.0873,
        "metrics": {"grpo_loss": 0.41, "val_loss": 1.27, "kl": np.float64(0.02)},  # a numpy scalar: the fallback
    }
    checkpoint.update(changes)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("d, h, layers, gate", [(24, 16, 3, True), (24, 16, 1, True)])
def test_a_lever_plus_rl_checkpoint_loads_as_the_sft_pointer(tmp_path, d, h, layers, gate):
    model = _model(d, h, layers, gate, seed=3)
    path = _rl_checkpoint(model, tmp_path / "grpo_epoch3.pt")
    loaded = load_pointer_checkpoint(path)
    assert (loaded.input_dim, loaded.hidden_dim, loaded.num_layers, loaded.use_gate) == (d, h, layers, gate)
    _same_weights(model, loaded)
    _same_step_scores(model, loaded, d)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("query_proj.weight"), "missing pointer keys: query_proj.weight"),
        (lambda s: s.update({"cand_proj.weight": torch.ones(16, 8)}), r"shapes that disagree: cand_proj.weight"),
        (lambda s: s.update({"cross_attn_layers.2.in_proj_bias": torch.ones(48)}), "missing pointer keys"),
    ],
)
def test_a_damaged_rl_checkpoint_is_refused_by_the_same_checks(tmp_path, edit, message):
    state = dict(_model(24, 16, 2, True).state_dict())
    edit(state)
    path = tmp_path / "grpo.pt"
    torch.save({"epoch": 0, "phase": "rce", "model_state_dict": state, "kl_beta": 0.1, "metrics": {}}, path)
    with pytest.raises(InputError, match=message):
        load_pointer_checkpoint(path)


def test_an_rl_checkpoint_without_weights_names_its_key(tmp_path):
    path = tmp_path / "grpo.pt"
    torch.save({"epoch": 0, "phase": "grpo", "model_state_dict": {}, "kl_beta": 0.1, "metrics": {}}, path)
    with pytest.raises(InputError, match="no 'model_state_dict'"):
        load_pointer_checkpoint(path)


class AttributeDict(dict):  # like Lightning's hparams container: a dict subclass, filled by SETITEMS
    pass


@pytest.mark.parametrize("protocol", [2, 4])
def test_hyper_parameters_of_many_kinds_load_as_data(tmp_path, monkeypatch, protocol):
    import argparse

    model = _model(24, 16, 1, True)
    hparams = AttributeDict(lr=0.1, dirs={1, 2}, path=Path("/data/okvqa"), cfg=argparse.Namespace(shot=2, ks=[1, 2]))
    path = tmp_path / "hp.ckpt"
    state = {POINTER_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path, pickle_protocol=protocol)
    monkeypatch.delattr(sys.modules[__name__], "AttributeDict")
    _same_weights(model, load_pointer_checkpoint(path))
