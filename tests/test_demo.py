"""scripts/demo.sh replaces its output folder only when an earlier demo made it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"


def _demo(tmp_path: Path, out: Path) -> subprocess.CompletedProcess:
    """demo.sh with stand-ins for python and moeprune: python names a data folder that does not
    exist, so the demo stops right after preparing OUT_DIR (nothing is run, nothing installed:
    python3, which scripts/setup.sh would use, fails)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("python", "echo /nonexistent"), ("python3", "exit 1"), ("moeprune", "exit 1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT_DIR": str(out), "SKIP_SETUP": "1"}
    return subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=60)


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    mine = tmp_path / "important"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    run = _demo(tmp_path, mine)
    assert run.returncode == 2 and "was not made by this demo" in run.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_demo_replaces_its_own_folder(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".moeprune-demo").touch()
    (out / "old.json").write_text("{}")
    run = _demo(tmp_path, out)
    assert run.returncode != 0  # stops at the missing data (the stand-in python)
    assert not (out / "old.json").exists() and (out / ".moeprune-demo").is_file()
