"""Helpers shared by the tests that drive the command line (``moeprune.cli.main``)."""

from __future__ import annotations

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
