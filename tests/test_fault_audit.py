"""scripts/fault_audit.py keeps working: its classification on made-up outcomes, and three quick
real cases run end to end (a valid run, two bad inputs that must end in one clean error line)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fault_audit.py"


def _audit():
    spec = importlib.util.spec_from_file_location("fault_audit", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fault_audit"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(audit, case, rc, stderr, before, after):
    run = audit.Run(case, Path("/nonexistent"), rc=rc, rcs=[rc], stderr=stderr)
    audit.classify(run, before, after)
    return sorted({c for c, _ in run.defects})


def test_classify_catches_data_loss_garbage_and_tracebacks():
    audit = _audit()
    bad_input = audit.Case("x", "t", None, ["plan"], "error", out="out.json")
    inputs = {"model": ("dir", ""), "model/config.json": ("file", "a")}
    clean = "moeprune: error: the profile is broken; re-run moeprune profile\n"
    assert _run(audit, bad_input, 2, clean, inputs, inputs) == []
    changed = {**inputs, "model/config.json": ("file", "b")}
    assert _run(audit, bad_input, 0, "", inputs, changed) == ["data-loss", "garbage-success"]
    assert _run(audit, bad_input, 1, "Traceback (most recent call last):\nValueError", inputs, inputs) == [
        "traceback"
    ]
    left = {**inputs, ".out.json.tmp-1": ("file", "c")}
    assert _run(audit, bad_input, 2, clean, inputs, left) == ["leftover"]
    assert _run(audit, bad_input, 2, "warning\n" + clean, inputs, inputs) == ["unclean-error"]
    assert _run(audit, bad_input, None, "", inputs, inputs) == ["hang"]


def test_quick_cases_end_to_end(tmp_path):
    out = tmp_path / "audit.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    only = ["control-inspect", "hub-id-not-cached-inspect", "data-missing-file-profile"]
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "-j", "3", "--json", str(out), *[a for o in only for a in ("--only", o)]],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    results = {c["name"]: c for c in json.loads(out.read_text())}
    assert sorted(results) == sorted(only), r.stdout + r.stderr
    assert results["control-inspect"]["exit"] == 0
    for name in only:  # these three pass today; a defect here is a regression
        assert results[name]["ok"], results[name]
    assert "3 runs tried, 3 ok" in r.stdout and r.returncode == 0
