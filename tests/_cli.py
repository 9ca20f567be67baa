"""Helpers shared by the tests that drive the command line (``moeprune.cli.main``)."""

from __future__ import annotations

import json
import subprocess
import sys

from moeprune.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``moeprune ARGS...`` in-process (each argument passed through ``str``) and return
    (exit code, stdout, stderr) captured during the run."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *words: str) -> None:
    """A user error: exit code 2 and exactly one stderr line, ``moeprune: error: ...``, that
    contains every one of ``words``."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeprune: error:"), err
    for word in words:
        assert word in lines[0], lines[0]


HEAVY = ("numpy", "torch", "transformers")


def run_cli_fresh(*args) -> tuple[int, list[str]]:
    """Run ``moeprune ARGS...`` in a fresh interpreter and return (exit code, which of
    :data:`HEAVY` it imported): what a command pays that the test process has already loaded."""
    argv = [str(a) for a in args]
    code = (
        "import json, sys\n"
        "from moeprune.cli import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit as exc:\n    rc = exc.code\n"
        f"print(json.dumps([rc, sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    rc, modules = json.loads(proc.stdout.strip().splitlines()[-1])
    return rc, modules
