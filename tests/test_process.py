"""Every entry point applies the process settings (lever_lm.process) before torch is imported.

One subprocess loads each entry point in turn -- the DVC stage scripts, the seed module,
`lever_lm.rl.cli`, the benchmarks -- with the settings removed from its environment. An import
hook notes the environment at the moment torch is first imported and stops there (so no entry
pays for loading torch); an entry that never imports torch is noted at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lever_lm.process import PROCESS_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
MODULES = [
    "lever_lm.models.v3.generate_rl_data",
    "lever_lm.rl.cli",
    "lever_lm.infoscore.cli",
    "lever_lm.models.v3.samplers",
]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("stages/*.py"), *ROOT.glob("benchmarks/*.py")])

PROBE = r"""
import importlib, importlib.abc, json, os, runpy, sys

NAMES = json.loads(sys.argv[1])
seen = {}


class TorchImported(BaseException):
    pass


class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            raise TorchImported({k: os.environ.get(k) for k in NAMES})
        return None


sys.meta_path.insert(0, Spy())
for entry in json.loads(sys.argv[2]):
    for key in NAMES:
        os.environ.pop(key, None)
    for module in [m for m in sys.modules if m.split(".")[0] in ("lever_lm", "stages", "benchmarks")]:
        del sys.modules[module]
    try:
        if entry.endswith(".py"):
            runpy.run_path(entry, run_name="__entry_check__")
        else:
            importlib.import_module(entry)
        seen[entry] = {"torch": False, "env": {k: os.environ.get(k) for k in NAMES}}
    except TorchImported as stop:
        seen[entry] = {"torch": True, "env": stop.args[0]}
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def environments() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_SETTINGS}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(PROCESS_SETTINGS)), json.dumps(MODULES + SCRIPTS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("entry", MODULES + SCRIPTS)
def test_the_entry_point_applies_the_process_settings_before_torch(environments: dict, entry: str):
    assert environments[entry]["env"] == PROCESS_SETTINGS, environments[entry]


def test_the_generator_entry_points_do_import_torch(environments: dict):
    """The probe is meaningful: the generator's entry points reach torch, and the settings were there first."""
    for entry in [*MODULES, "stages/generate_rl_data.py", "stages/validate.py", "stages/beam_data.py"]:
        assert environments[entry]["torch"], entry


def test_a_value_the_user_set_wins(monkeypatch):
    from lever_lm.process import apply_process_settings

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    apply_process_settings()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == PROCESS_SETTINGS["PYTORCH_CUDA_ALLOC_CONF"]


def test_a_ray_worker_applies_them_before_it_loads_a_model(monkeypatch):
    """A Ray worker is started by Ray, not by an entry point: its setup applies them (before CUDA starts)."""
    pytest.importorskip("ray")
    from lever_lm.errors import InputError
    from lever_lm.rl.engines.ray import BlockWorker, WorkerSpec

    for key in PROCESS_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    threads = __import__("torch").get_num_threads()
    spec = WorkerSpec("qwen2.5_vl_3B", None, {}, None, None, "cpu", threads, ("rl",), {"code": "another"})
    with pytest.raises(InputError):  # stops at the code check, before any model is loaded
        BlockWorker().setup(None, spec)
    assert {k: os.environ.get(k) for k in PROCESS_SETTINGS} == PROCESS_SETTINGS
