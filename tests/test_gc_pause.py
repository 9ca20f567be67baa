"""Garbage collection around imports and model loads (issue 17, `profile` at the stock forward's
speed): paused while they run, frozen only where the process ends with the command."""

from __future__ import annotations

import gc
import json
import sys

import pytest

from _cli import run_cli
from moeprune import cli, modelio
from moeprune.testbed import DATA_DIR, MODEL_DIR


@pytest.fixture
def unfrozen():
    """Leave the test process as it was: nothing frozen, the collector on."""
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()
    gc.enable()


def test_gc_paused_restores_the_collector_even_on_error(unfrozen):
    with modelio.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), modelio.gc_paused():
        raise RuntimeError("load failed")
    assert gc.isenabled()
    gc.disable()  # a caller that turned it off keeps it off
    with modelio.gc_paused():
        pass
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0  # library use freezes nothing


def test_load_model_runs_with_the_collector_paused(monkeypatch, unfrozen):
    import importlib

    load_module = importlib.import_module("moeprune.load")  # the package exports a function `load`
    seen = []

    class Stub:
        def eval(self):
            return self

    def from_pretrained(path, **kwargs):
        seen.append(gc.isenabled())
        return Stub()

    monkeypatch.setattr(load_module, "from_pretrained", from_pretrained)
    lm, tok = modelio.load_model(str(MODEL_DIR))
    assert isinstance(lm, Stub) and tok is not None
    assert seen == [False] and gc.isenabled()


@pytest.mark.parametrize("owns_process", [False, True])
def test_profile_freezes_its_load_only_when_it_owns_the_process(tmp_path, capsys, monkeypatch, unfrozen, owns_process):
    data = tmp_path / "two.jsonl"
    lines = (DATA_DIR / "python.calib.jsonl").read_text().splitlines()[:2]
    data.write_text("".join(json.dumps({"text": json.loads(x)["text"][:200]}) + "\n" for x in lines))
    monkeypatch.setattr(cli, "OWNS_PROCESS", owns_process)
    monkeypatch.setattr(modelio, "FREEZE_AFTER_PAUSE", False)
    rc, _, err = run_cli(capsys, "profile", MODEL_DIR, "--data", data, "--out", tmp_path / "p.profile.safetensors", "-q")
    assert rc == 0, err
    # under `python -m moeprune` / the console script, the imports and the model are frozen (never
    # walked again); called in-process (tests, other callers), nothing is frozen and the model can die
    assert (gc.get_freeze_count() > 0) is owns_process
    assert gc.isenabled()


def test_run_freezes_everything_before_exit(monkeypatch, unfrozen):
    monkeypatch.setattr(cli, "OWNS_PROCESS", False)
    monkeypatch.setattr(sys, "argv", ["moeprune", "--version"])
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 0
    assert cli.OWNS_PROCESS
    assert gc.get_freeze_count() > 0  # the interpreter's last collections skip them
