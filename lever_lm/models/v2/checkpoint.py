"""Load and save PointerSelectorV2 weights in the Lightning `.ckpt` layout of Lever-LM (docs/formats.md §3.4).

A Lever-LM SFT checkpoint is `{"state_dict": {...}, "hyper_parameters": {...}, "epoch", ...}`;
the pointer's weights sit under `lever_lm.pointer_selector.`, the frozen CLIP towers beside them
(ignored here). `hyper_parameters` holds no architecture, so d, h, L and the gate are read from
the tensor shapes. Older checkpoints call layer 0 `cross_attn.*` / `attn_norm.*`. The `.pt` that
Lever-Plus's RL trainer (`grpo_post_train`) writes, `{"epoch", "phase", "model_state_dict", "kl_beta",
"metrics"}`, holds a PointerSelectorV3 (a V2 with RL losses, same weights) under bare names: it loads
the same way, so RL data can be made again with an RL-trained pointer.

The one thing this loader must never do is what `load_state_dict(strict=False)` does quietly: hand
back a partly random network. RL data made with such a pointer looks plausible and is worthless,
so every missing, unexpected or mis-shaped pointer key is an InputError that lists them.
"""

from __future__ import annotations

import _compat_pickle
import collections
import logging
import pickle
import re
import types
from pathlib import Path

import torch
from torch import Tensor

from lever_lm.errors import InputError, short_error
from lever_lm.io import atomic_torch_save
from lever_lm.models.v2.pointer_selector import PointerSelectorV2

log = logging.getLogger(__name__)

POINTER_PREFIX = "lever_lm.pointer_selector."
# Top-level module names of PointerSelectorV2 (new and old), to recognise a bare pointer state dict.
_POINTER_ROOTS = ("input_proj", "cross_attn_layers", "cross_attn", "attn_norms", "attn_norm", "query_proj",
                  "cand_proj", "query_update_gate")  # fmt: skip
_OLD_LAYER0_NAMES = (("cross_attn.", "cross_attn_layers.0."), ("attn_norm.", "attn_norms.0."))
_LAYER_KEY = re.compile(r"^cross_attn_layers\.(\d+)\.")
# Where the weights sit: Lightning's `.ckpt`, then the `.pt` of Lever-Plus's RL trainer (else a bare state dict).
STATE_DICT_KEYS = ("state_dict", "model_state_dict")
# Written into saved checkpoints so Lightning's own loader accepts them (it migrates by this version).
LIGHTNING_VERSION = "2.4.0"


def load_pointer_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> PointerSelectorV2:
    """The pointer network of a Lightning checkpoint (or of a bare pointer state dict), in eval mode."""
    path = Path(path)
    state_dict = _read_state_dict(path)
    weights = _rename_old_keys(pointer_weights(state_dict, path), path)
    model = _model_for(weights, path)
    _check_keys_and_shapes(model, weights, path)
    model.load_state_dict(weights, strict=True)
    return model.to(map_location).eval()


def save_pointer_checkpoint(
    model: PointerSelectorV2,
    path: str | Path,
    hyper_parameters: dict | None = None,
    epoch: int = 0,
    global_step: int = 0,
) -> None:
    """Write `model` in the Lightning layout Lever-LM reads, atomically."""
    checkpoint = {
        "state_dict": {POINTER_PREFIX + name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "hyper_parameters": dict(hyper_parameters or {}),
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": LIGHTNING_VERSION,
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    atomic_torch_save(checkpoint, path)


def pointer_weights(state_dict: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The pointer's tensors with the prefix stripped; a prefix-less pointer state dict is taken as is."""
    prefixed = {k[len(POINTER_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(POINTER_PREFIX)}
    if prefixed:
        return prefixed
    bare = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in _POINTER_ROOTS}
    if bare:
        return bare
    sample = ", ".join(list(state_dict)[:5]) or "none"
    raise InputError(path, f"no pointer weights: no key starts with '{POINTER_PREFIX}' (first keys: {sample})")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, dict):
        raise InputError(path, f"not a checkpoint: expected a dict, found {type(checkpoint).__name__}")
    key = next((k for k in STATE_DICT_KEYS if k in checkpoint), None)
    state_dict, where = (checkpoint[key], key) if key else (checkpoint, "state_dict")
    if not isinstance(state_dict, dict) or not state_dict:
        raise InputError(path, f"not a checkpoint: no '{where}'")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise InputError(path, f"not a checkpoint: '{where}' entries that are not tensors: {not_tensors[:5]}")
    return state_dict


def _torch_load(path: Path):
    """`torch.load` that never runs code from the file and never changes anything outside what it returns.

    Weights-only loading is tried first. A Lightning checkpoint's `hyper_parameters` may pickle
    other objects (OmegaConf or Hydra configs, paths, ...), which the weights-only loader refuses.
    Then the file is read again by `_DataOnlyUnpickler`, which keeps torch's weights-only rules
    and changes only one thing: a global outside torch's allowlist -- importable or not, `os.system`
    included -- becomes an inert stand-in that records what it is given, instead of an error. So a
    crafted checkpoint can do nothing but fail to load or fail to hold pointer weights.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises KeyError, EOFError, ... on a non-torch file
        if not (isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)):
            raise InputError(path, f"not a checkpoint (torch.load failed: {short_error(error)})") from None
    log.info("%s: checkpoint metadata pickles other objects; reading them as inert stand-ins", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_data_only_pickle)
    except Exception as error:  # noqa: BLE001 - any failure here means "cannot read this file"
        raise InputError(path, f"not a checkpoint (torch.load failed: {short_error(error)})") from None


class InertObject:
    """Takes the place of any pickled global outside the allowlist; records what it was given, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    # A stand-in for a dict or list subclass (Lightning's AttributeDict, say) is filled like one
    # (NEWOBJ makes it without calling __init__).
    def __setitem__(self, key, value):
        self.__dict__.setdefault("mapping", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("elements", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("elements", []).extend(values)


def _allowed_globals() -> dict:
    """torch's own allowlist for weights-only loading: tensor rebuilds, storages, dtypes, containers."""
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _Opcodes(dict):
    """The opcodes the loader runs; any other (INST, OBJ, EXT*, out-of-band buffers) is refused."""

    def __missing__(self, code: int):
        raise pickle.UnpicklingError(f"pickle opcode {bytes([code])!r} is not allowed in a checkpoint")


# Opcodes that only build plain data on the stack (globals are resolved by `find_class`).
_DATA_OPCODES = {
    getattr(pickle, name)[0]
    for name in (
        "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 "
        "FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 UNICODE "
        "BINUNICODE SHORT_BINUNICODE BINUNICODE8 TUPLE EMPTY_TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST LIST EMPTY_DICT "
        "DICT EMPTY_SET FROZENSET GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE GLOBAL STACK_GLOBAL "
        "PERSID BINPERSID"
    ).split()
}
_BUILDABLE = (torch.Tensor, torch.nn.Parameter, collections.OrderedDict)  # as torch's weights-only loader
_LIST_TARGETS = (list,)
_DICT_TARGETS = (dict, collections.OrderedDict, collections.Counter)
_SET_TARGETS = (set,)


class _DataOnlyUnpickler(pickle._Unpickler):
    """torch's weights-only rules, with a stand-in for every global outside its allowlist.

    Built on Python's pure-Python unpickler, with every opcode that acts on an object checked:
    REDUCE and NEWOBJ call only torch's allowlisted callables, `nn.Parameter` and the stand-ins;
    BUILD sets state only on a tensor, a parameter, an ordered dict or a stand-in; APPEND, SETITEM
    and ADDITEMS fill only lists, dicts, sets and stand-ins. So no opcode can reach a module-level
    object: `setattr` on `torch._utils._rebuild_tensor_v2` or `collections.Counter` (which would
    change every later `torch.load` or every `Counter` in the process) is refused, like code.
    """

    _allowed: dict | None = None

    def find_class(self, module: str, name: str):
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle maps them (`__builtin__.set`)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = self._allowlist().get(f"{module}.{name}")
        if allowed is not None:
            return allowed
        return type(name, (InertObject,), {"__module__": module, "__qualname__": name})

    @classmethod
    def _allowlist(cls) -> dict:
        if _DataOnlyUnpickler._allowed is None:
            _DataOnlyUnpickler._allowed = _allowed_globals()
        return _DataOnlyUnpickler._allowed

    def _callable(self, func, opcode: str, must_be_class: bool = False):
        is_stand_in = isinstance(func, type) and issubclass(func, InertObject)
        allowed = is_stand_in or func is torch.nn.Parameter or any(func is f for f in self._allowlist().values())
        if not allowed or (must_be_class and not isinstance(func, type)):
            raise pickle.UnpicklingError(f"{opcode} on {_describe(func)} is not allowed in a checkpoint")

    def load_reduce(self):
        self._callable(self.stack[-2], "REDUCE")
        super().load_reduce()

    def load_newobj(self):
        self._callable(self.stack[-2], "NEWOBJ", must_be_class=True)
        super().load_newobj()

    def load_newobj_ex(self):
        self._callable(self.stack[-3], "NEWOBJ_EX", must_be_class=True)
        super().load_newobj_ex()

    def load_build(self):
        target = self.stack[-2]
        if not (isinstance(target, InertObject) or type(target) in _BUILDABLE):
            raise pickle.UnpicklingError(f"BUILD on {_describe(target)} is not allowed in a checkpoint")
        super().load_build()

    def _target(self, position: int, kinds: tuple, opcode: str):
        target = self.stack[position]
        if not (isinstance(target, InertObject) or type(target) in kinds):
            raise pickle.UnpicklingError(f"{opcode} into {_describe(target)} is not allowed in a checkpoint")

    def load_append(self):
        self._target(-2, _LIST_TARGETS, "APPEND")
        super().load_append()

    def load_appends(self):
        self._target_of_mark(_LIST_TARGETS, "APPENDS")
        super().load_appends()

    def load_setitem(self):
        self._target(-3, _DICT_TARGETS, "SETITEM")
        super().load_setitem()

    def load_setitems(self):
        self._target_of_mark(_DICT_TARGETS, "SETITEMS")
        super().load_setitems()

    def load_additems(self):
        self._target_of_mark(_SET_TARGETS, "ADDITEMS")
        super().load_additems()

    def _target_of_mark(self, kinds: tuple, opcode: str) -> None:
        """The object below the MARK, which APPENDS, SETITEMS and ADDITEMS fill."""
        below = self.metastack[-1] if self.metastack else []
        if not below:
            raise pickle.UnpicklingError("a pickle opcode finds no object to fill")
        target = below[-1]
        if not (isinstance(target, InertObject) or type(target) in kinds):
            raise pickle.UnpicklingError(f"{opcode} into {_describe(target)} is not allowed in a checkpoint")

    dispatch = _Opcodes({code: f for code, f in pickle._Unpickler.dispatch.items() if code in _DATA_OPCODES})
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems


def _describe(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{name}"


def _data_only_load(file, **kwargs):
    return _DataOnlyUnpickler(file, **kwargs).load()


# What torch.load calls: the Unpickler (current format) and load (legacy format), both data only.
_data_only_pickle = types.SimpleNamespace(Unpickler=_DataOnlyUnpickler, load=_data_only_load, __name__="data_only")


def _rename_old_keys(weights: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Old single-layer names (`cross_attn.*`, `attn_norm.*`) -> layer 0 of the current names."""
    renamed: dict[str, Tensor] = {}
    for key, tensor in weights.items():
        new_key = key
        for old, new in _OLD_LAYER0_NAMES:
            if key.startswith(old):
                new_key = new + key[len(old) :]
        if new_key in renamed:
            raise InputError(path, f"pointer key {key!r} and {new_key!r} both present (old and new names of layer 0)")
        renamed[new_key] = tensor
    return renamed


def _model_for(weights: dict[str, Tensor], path: Path) -> PointerSelectorV2:
    """Build the network whose dimensions the checkpoint's shapes say: d, h, L, gate."""
    cand = weights.get("cand_proj.weight")
    if cand is None or cand.ndim != 2:
        raise InputError(path, f"pointer key '{POINTER_PREFIX}cand_proj.weight' is missing or not a matrix")
    hidden_dim = cand.shape[0]
    input_proj = weights.get("input_proj.weight")
    input_dim = input_proj.shape[1] if input_proj is not None and input_proj.ndim == 2 else hidden_dim
    layers = {int(m.group(1)) for key in weights if (m := _LAYER_KEY.match(key))}
    num_layers = max(layers) + 1 if layers else 0
    if num_layers == 0:
        raise InputError(path, f"pointer keys '{POINTER_PREFIX}cross_attn_layers.*' (or old 'cross_attn.*') missing")
    use_gate = any(key.startswith("query_update_gate.") for key in weights)
    return PointerSelectorV2(input_dim, hidden_dim=hidden_dim, num_layers=num_layers, use_gate=use_gate)


def _check_keys_and_shapes(model: PointerSelectorV2, weights: dict[str, Tensor], path: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = sorted(
        f"{name} {list(weights[name].shape)} (expected {list(shape)})"
        for name, shape in expected.items()
        if name in weights and tuple(weights[name].shape) != shape
    )
    problems = []
    if missing:
        problems.append("missing pointer keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected pointer keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shapes that disagree: " + ", ".join(mismatched))
    if problems:
        arch = f"d={model.input_dim}, h={model.hidden_dim}, L={model.num_layers}, gate={model.use_gate}"
        raise InputError(path, f"pointer weights do not fit PointerSelectorV2({arch}); " + "; ".join(problems))
