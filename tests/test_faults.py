"""Faults while writing outputs: signals, a full disk, a read-only folder, two runs at once, and
``--force`` aimed at what it must never replace (issue 11: 1-4, 10, 14, 15; issue 12: umask).

Most cases run in-process through :mod:`moeprune.outputs`; signals and concurrency run the real
command line in subprocesses (a driver makes the shard writing pause, so a signal lands while the
temporary folder holds a partial shard)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import moeprune.outputs as outputs
from _cli import assert_user_error, run_cli
from moeprune.errors import UserError
from moeprune.outputs import MARKER, check_output, clean_stale, prepare_output, temp_name, write_marker
from moeprune.plan import Plan
from test_report import make_profile

SRC = Path(__file__).resolve().parents[1] / "src"


# --- a tiny model and a plan for it ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, plan file): a tiny Mixtral and a plan keeping 6 of its 8 experts per layer."""
    from moeprune.arch import find_moe_blocks
    from moeprune.profile import fingerprint_fields, model_fingerprint
    from moeprune.testing.tiny import tiny_model

    root = tmp_path_factory.mktemp("faults")
    m = tiny_model("mixtral")
    m.save_pretrained(root / "model")
    blocks = find_moe_blocks(m)
    kept = {b.layer: [0, 1, 2, 3, 4, 5] for b in blocks}
    plan = Plan(
        model_fingerprint=model_fingerprint(fingerprint_fields(m.config, blocks)),
        model_type=m.config.model_type,
        layers=sorted(kept),
        num_experts=blocks[0].num_experts,
        top_k=blocks[0].top_k,
        method="frequency",
        kept=kept,
    )
    plan.save(root / "plan.json")
    return root / "model", root / "plan.json"


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1, 4: what an output may be -------------------------------------------------------------------------


def test_output_never_is_contains_or_sits_inside_an_input(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(m)
    cases = [
        (m, True, "is the input"),
        (link, True, "is the input"),  # symlinks resolved
        (m / "sub", True, "is inside the input"),
        (tmp_path, True, "contains the input"),
        (m / "config.json", False, "is inside the input"),  # eval --output M/config.json
        (link / "model.safetensors", False, "is inside the input"),
    ]
    for out, folder, words in cases:
        with pytest.raises(UserError, match=words):
            check_output(out, inputs=[m], force=True, folder=folder)
    profile = tmp_path / "p.profile.safetensors"
    profile.write_bytes(b"x")
    with pytest.raises(UserError, match="is the profile"):
        check_output(profile, inputs=[("profile", profile)], force=True, folder=False)
    assert json.loads((m / "config.json").read_text()) == {}


def test_force_replaces_only_what_moeprune_wrote(tmp_path):
    foreign = tmp_path / "sandbox"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty$|not empty;"):
        check_output(foreign)
    with pytest.raises(UserError, match="not written by moeprune"):
        check_output(foreign, force=True)
    with pytest.raises(UserError, match="not written by moeprune"):
        outputs.write_dir_atomically(foreign, lambda tmp: (tmp / "x").write_text("new"))
    assert _tree(foreign) == {"notes.txt": b"mine"}
    empty = tmp_path / "empty"
    empty.mkdir()
    with prepare_output(empty) as tmp:  # an empty folder is fine without --force
        (tmp / "a").write_text("1")
    with prepare_output(empty, force=True, kind="compare") as tmp:  # moeprune's own: replaced
        (tmp / "b").write_text("2")
    assert _tree(empty) == {MARKER: (empty / MARKER).read_bytes(), "b": b"2"}
    assert json.loads((empty / MARKER).read_text())["kind"] == "compare"
    assert _hidden(tmp_path) == []


def test_files_are_replaced_only_with_force_and_only_moeprune_files(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moeprune-plan/1"}))
    other = tmp_path / "config.json"
    other.write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        check_output(plan, folder=False)
    assert check_output(plan, folder=False, force=True) == plan
    with pytest.raises(UserError, match="not a moeprune file"):
        check_output(other, folder=False, force=True)
    prof = tmp_path / "p.profile.safetensors"
    save_file({"a": torch.zeros(2)}, str(prof), metadata={"format": "moeprune-profile/1"})
    weights = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    assert outputs.is_moeprune_file(prof) and not outputs.is_moeprune_file(weights)
    with prepare_output(plan, folder=False, force=True) as tmp:
        tmp.write_text("new")
    assert plan.read_text() == "new" and _hidden(tmp_path) == []


def test_report_force_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    prof = tmp_path / "code.profile.safetensors"
    make_profile().save(prof)
    (sandbox / "keep.txt").write_text("x")
    before = _tree(sandbox)
    rc, _, err = run_cli(capsys, "report", prof, "--out", sandbox, "--force")
    assert_user_error(rc, err, "not written by moeprune")
    assert _tree(sandbox) == before and _hidden(sandbox) == [] and _hidden(tmp_path) == []
    # a folder holding one of its inputs is refused even when moeprune wrote it
    (sandbox / "keep.txt").unlink()
    write_marker(sandbox, "report")
    inner = sandbox / "code.profile.safetensors"
    make_profile().save(inner)
    before = _tree(sandbox)
    rc, _, err = run_cli(capsys, "report", inner, "--out", sandbox, "--force")
    assert_user_error(rc, err, "contains the profile")
    assert _tree(sandbox) == before


def test_prune_force_refuses_the_parent_of_its_input(model, tmp_path, capsys):
    src, plan = model
    before = _tree(src.parent)
    for out in (src, src / "pruned", src.parent):
        rc, _, err = run_cli(capsys, "prune", src, "--plan", plan, "--out", out, "--force")
        assert_user_error(rc, err, "input model")
    assert _tree(src.parent) == before


# --- issue 12 §3: permissions --------------------------------------------------------------------------------


def test_outputs_respect_the_umask(model, tmp_path, capsys):
    from moeprune.profile import atomic_write

    src, plan = model
    old = os.umask(0o022)
    try:
        rc, _, err = run_cli(capsys, "prune", src, "--plan", plan, "--out", tmp_path / "pruned")
        assert rc == 0, err
        Plan.load(plan).save(tmp_path / "plan.json")
        atomic_write(tmp_path / "p.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        os.umask(old)
    pruned = tmp_path / "pruned"
    assert pruned.stat().st_mode & 0o777 == 0o755
    for f in [*pruned.iterdir(), tmp_path / "plan.json", tmp_path / "p.bin"]:
        assert f.stat().st_mode & 0o777 == 0o644, f


# --- 10: a full disk, a read-only folder ----------------------------------------------------------------------


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with prepare_output(out, kind="model") as tmp:
        (tmp / "old.txt").write_text("old")
    before = _tree(out)
    with pytest.raises(UserError, match="no space left"), prepare_output(out, force=True) as tmp:
        (tmp / "part").write_text("partial")
        # safetensors' own error, as save_file raises it on a full tmpfs (it writes through a temp
        # file and a rename, so /dev/full cannot stand in: it would be replaced)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with (
        pytest.raises(UserError, match="no space left"),
        prepare_output(out, force=True),
        open("/dev/full", "w") as fh,  # Python's OSError ENOSPC
    ):
        fh.write("x")
    assert _tree(out) == before and _hidden(tmp_path) == []


def test_prune_on_a_full_disk_is_one_line(model, tmp_path, capsys, monkeypatch):
    import moeprune.surgery as surgery

    src, plan = model

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(surgery, "write_safetensors", full)
    rc, _, err = run_cli(capsys, "prune", src, "--plan", plan, "--out", tmp_path / "pruned")
    assert_user_error(rc, err, "no space left", "pruned")
    assert list(tmp_path.iterdir()) == []
    # too little free space for the whole output is refused before anything is written
    target = prepare_output(tmp_path / "big")
    with pytest.raises(UserError, match="needs .* free"):
        target.need(2**62)


def _read_only(monkeypatch, folder: Path) -> None:
    """Make ``os.open``/``os.mkdir`` in ``folder`` fail with EROFS (tests run as root, so chmod would
    not stop them)."""
    real_open, real_mkdir = os.open, os.mkdir

    def ro(fn):
        def wrapped(path, *args, **kwargs):
            if os.path.abspath(os.fsdecode(path)).startswith(str(folder)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
            return fn(path, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(os, "open", ro(real_open))
    monkeypatch.setattr(os, "mkdir", ro(real_mkdir))


def test_read_only_output_is_found_up_front(model, tmp_path, capsys, monkeypatch):
    src, plan = model
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    with pytest.raises(UserError, match="read-only file system"):
        check_output(ro / "plan.json", folder=False)
    rc, _, err = run_cli(capsys, "prune", src, "--plan", plan, "--out", ro / "pruned")
    assert_user_error(rc, err, "read-only")
    assert list(ro.iterdir()) == []


# --- 3: one run at a time --------------------------------------------------------------------------------------


def test_second_writer_of_an_output_fails_at_once(tmp_path):
    out = tmp_path / "out"
    with prepare_output(out) as tmp:
        assert _hidden(tmp_path) == sorted([tmp.name, ".out.moeprune-lock"])
        with pytest.raises(UserError, match="another moeprune run .*writing --out"):
            prepare_output(out).__enter__()
        (tmp / "a").write_text("1")
    assert _hidden(tmp_path) == []  # the lock file goes with the lock


# --- 14: what a killed run leaves behind ----------------------------------------------------------------------


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    dead = _dead_pid()
    host_tmp = tmp_path / temp_name("out")
    stale = tmp_path / host_tmp.name.replace(f"-{os.getpid()}-", f"-{dead}-")
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    alive = tmp_path / host_tmp.name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-")
    alive.mkdir()
    old = tmp_path / temp_name("gone", "old").replace(f"-{os.getpid()}-", f"-{dead}-")
    old.mkdir()
    (old / "config.json").write_text("{}")  # cut between the two renames of a replace
    with prepare_output(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "gone", "out"])
    assert (tmp_path / "gone" / "config.json").is_file()
    assert clean_stale(tmp_path) == []


# --- 2: a signal while an old output is replaced --------------------------------------------------------------


def test_replace_keeps_the_output_whole_under_a_signal(tmp_path, monkeypatch):
    from moeprune.surgery import _replace_dir

    out, tmp = tmp_path / "out", tmp_path / ".out.new"
    out.mkdir()
    (out / "v").write_text("old")
    tmp.mkdir()
    (tmp / "v").write_text("new")
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)  # the two-rename path
    real = os.rename
    calls = []

    def rename(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C between moving the old out away and the new in

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _replace_dir(tmp, out)
    assert (out / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_swaps_in_one_step(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / ".out.new"
    for folder, text in ((out, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "v").write_text(text)
    outputs.replace_dir(tmp, out)
    assert (out / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- signals and concurrency on the real command line --------------------------------------------------------

# Runs the CLI with shard writing paused after the first shard (so the temporary folder holds a
# partial output when the signal comes); the file named by MP_READY appears when it pauses.
DRIVER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
import moeprune.surgery as s
real = s.write_safetensors
def slow(*args, **kwargs):
    real(*args, **kwargs)
    open(os.environ["MP_READY"], "w").close()
    time.sleep(float(os.environ["MP_SLEEP"]))
s.write_safetensors = slow
from moeprune.cli import run
sys.argv[0] = "moeprune"
run()
"""


def _start(tmp_path: Path, name: str, args: list, sleep: float = 60) -> tuple[subprocess.Popen, Path]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ready = tmp_path / f"{name}.ready"
    env = {**os.environ, "PYTHONPATH": str(SRC), "MP_READY": str(ready), "MP_SLEEP": str(sleep)}
    cmd = [sys.executable, str(driver), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def _wait_ready(proc: subprocess.Popen, ready: Path) -> None:
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never reached the write: {proc.communicate()}")
        time.sleep(0.05)


SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}


def test_signals_while_writing_keep_the_old_output(model, tmp_path, capsys):
    """Ctrl-C, SIGTERM and SIGKILL while `prune --force` writes over an existing output (three
    runs at once, to keep the test short)."""
    src, plan = model
    runs = {}
    for sig in SIGNALS:
        work = tmp_path / sig.name
        work.mkdir()
        out = work / "pruned"
        assert run_cli(capsys, "prune", src, "--plan", plan, "--out", out)[0] == 0
        proc, ready = _start(tmp_path, sig.name, ["prune", src, "--plan", plan, "--out", out, "--force"])
        runs[sig] = (work, out, _tree(out), proc, ready)
    for sig, (work, out, before, proc, ready) in runs.items():
        _wait_ready(proc, ready)
        assert [p for p in _hidden(work) if ".moeprune-tmp-" in p]  # a partial output, in a temporary
        proc.send_signal(sig)
        out_text, err = proc.communicate(timeout=60)
        assert proc.returncode == SIGNALS[sig], (sig, err)
        assert _tree(out) == before, sig
        if sig == signal.SIGKILL:  # no cleanup is possible: the next run removes what it left
            assert _hidden(work)
            rc, _, err2 = run_cli(capsys, "prune", src, "--plan", plan, "--out", out, "--force")
            assert rc == 0, err2
        else:
            word = "interrupted" if sig == signal.SIGINT else "terminated"
            assert err.strip().splitlines() == [f"moeprune: error: {word}; nothing was written"], err
        assert _hidden(work) == [], sig


# A Ctrl-C that lands in an exec/eval of a string (a dataclass being built during an import):
# under `python -m` CPython then killed the process by SIGINT at exit (status -2, not 130).
EXEC_PROBE = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import moeprune.cli as cli
def register():
    exec("os.kill(os.getpid(), signal.SIGINT)\\nimport time\\ntime.sleep(30)", {"os": os, "signal": signal})
cli._register_commands = register
cli.run()
"""


def test_ctrl_c_inside_an_exec_exits_130(tmp_path):
    (tmp_path / "exec_probe.py").write_text(EXEC_PROBE)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path}"}
    cmd = [sys.executable, "-m", "exec_probe", "inspect", "x"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["moeprune: error: interrupted; nothing was written"]


def test_ctrl_c_turned_into_another_error_exits_130(tmp_path):
    """transformers' lazy import catches what a Ctrl-C left half-imported and raises
    ModuleNotFoundError: still an interrupt, not a traceback with exit 1."""
    probe = EXEC_PROBE.replace(
        "cli._register_commands = register",
        "def converted():\n    try:\n        register()\n    except KeyboardInterrupt:\n"
        "        raise ModuleNotFoundError('Could not import module')\ncli._register_commands = converted",
    )
    (tmp_path / "convert_probe.py").write_text(probe)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{tmp_path}"}
    cmd = [sys.executable, "-m", "convert_probe", "inspect", "x"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["moeprune: error: interrupted; nothing was written"]


def test_two_runs_into_one_output_one_succeeds(model, tmp_path):
    src, plan = model
    out = tmp_path / "pruned"
    runs = [_start(tmp_path, f"r{i}", ["prune", src, "--plan", plan, "--out", out], sleep=3) for i in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p, _ in runs]
    for p, _ in runs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeprune: error:"), err
    assert "another moeprune run" in err[0] or "not empty" in err[0], err
    assert (out / "config.json").is_file() and _hidden(tmp_path) == []


# --- 15: Ctrl-C while the command line starts -------------------------------------------------------------------


def test_ctrl_c_during_startup_imports_is_one_line(monkeypatch, capsys):
    import moeprune.cli as cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert cli.main(["inspect", "--help"]) == 130
    assert capsys.readouterr().err == "moeprune: error: interrupted; nothing was written\n"
    monkeypatch.setattr(cli, "main", lambda: (_ for _ in ()).throw(outputs.Interrupted(signal.SIGTERM)))
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 143
    assert capsys.readouterr().err == "moeprune: error: terminated; nothing was written\n"


def test_writer_marker_is_moeprune_json(tmp_path):
    write_marker(tmp_path, "library")
    data = json.loads((tmp_path / MARKER).read_text())
    assert data["tool"] == "moeprune" and data["kind"] == "library" and data["version"]


# --- every command, through the API: inputs, --force, locks, up-front checks (issue 11: 1, 3, 4, 10, 14;
# --- issue 12 §5) -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> dict[str, Path]:
    """A tiny model with a tokenizer, a data file, a profile of it and a plan (paths by name)."""
    from moeprune import api
    from moeprune.testing.tiny import byte_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("wired")
    m = tiny_model("mixtral")
    m.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(4)))
    prof = root / "p.profile.safetensors"
    api.profile(root / "model", [data], out=prof)
    api.plan(prof, "frequency", 6, out=root / "plan.json")
    return {"root": root, "model": root / "model", "data": data, "profile": prof, "plan": root / "plan.json"}


def _refusals(p: dict[str, Path]) -> list[tuple[list[Any], str]]:
    """(command line, word of its one-line error): outputs that are, contain or sit inside an input."""
    m, d, prof, plan, root = p["model"], p["data"], p["profile"], p["plan"], p["root"]
    return [
        (["profile", m, "--data", d, "--out", m / "model.safetensors", "--force"], "input model"),
        (["profile", m, "--data", d, "--out", m / "config.json", "--force"], "input model"),
        (["plan", prof, "-m", "frequency", "-k", "6", "--out", m / "config.json", "--force"], "model"),
        (["plan", prof, "-m", "frequency", "-k", "6", "--out", prof, "--force"], "input profile"),
        (["eval", m, "--task", d, "--output", m / "config.json", "--force"], "input model"),
        (["eval", m, "--task", d, "--output", d, "--force"], "task file"),
        (["compare", m, "--profile", prof, "--task", d, "--out", m, "--force"], "input model"),
        (["compare", m, "--profile", prof, "--task", d, "--out", root, "--force"], "contains"),
        (["report", prof, "--out", root, "--force"], "contains"),
        (["library", "build", m, "--task", f"a={prof}", "--keep", "6", "--out", m, "--force"], "input model"),
        (["library", "build", m, "--task", f"a={d}", "--keep", "6", "--out", root, "--force"], "contains"),
        (["prune", m, "--plan", plan, "--out", root, "--force"], "contains"),
        (["prune", m, "--data", d, "-m", "frequency", "-k", "6", "--out", root, "--force"], "contains"),
        (["prune", m, "--data", d, "-m", "frequency", "-k", "6", "--out", m / "sub"], "input model"),
        (["profile", "merge", prof, prof, "--out", prof, "--force"], "input profile"),
    ]


def test_no_command_writes_over_or_around_its_inputs(lm, capsys):
    before = _tree(lm["root"])
    for args, word in _refusals(lm):
        rc, _, err = run_cli(capsys, *args)
        assert_user_error(rc, err, word)
        assert _tree(lm["root"]) == before, args
        assert _hidden(lm["root"]) == [] and _hidden(lm["model"]) == [], args


def test_api_applies_the_same_checks(lm):
    from moeprune import api

    m, d, prof = lm["model"], lm["data"], lm["profile"]
    before = _tree(lm["root"])
    with pytest.raises(UserError, match="model"):
        api.plan(prof, "frequency", 6, out=m / "config.json", force=True)
    with pytest.raises(UserError, match="task file"):
        api.evaluate(m, [str(d)], out=d, force=True)
    with pytest.raises(UserError, match="input model"):
        api.profile(m, [d], out=m / "model.safetensors", force=True)
    with pytest.raises(UserError, match="contains"):
        api.report([prof], lm["root"], force=True)
    with pytest.raises(UserError, match="input model"):
        api.build_library(m, {"a": prof}, 6, m, force=True)
    assert _tree(lm["root"]) == before


def test_profile_plan_and_eval_replace_a_file_only_with_force(lm, tmp_path, capsys):
    m, d, prof = lm["model"], lm["data"], lm["profile"]
    cases = [
        (["profile", m, "--data", d, "-q", "--out", tmp_path / "x.profile.safetensors"], "x.profile.safetensors"),
        (["plan", prof, "-m", "frequency", "-k", "6", "--out", tmp_path / "plan.json"], "plan.json"),
        (["eval", m, "--task", d, "--output", tmp_path / "eval.json"], "eval.json"),
    ]
    for args, name in cases:
        assert run_cli(capsys, *args)[0] == 0
        written = (tmp_path / name).read_bytes()
        rc, _, err = run_cli(capsys, *args)
        assert_user_error(rc, err, "already exists", "--force")
        assert run_cli(capsys, *args, "--force")[0] == 0
        assert (tmp_path / name).stat().st_size > 0 and len(written) > 0
        (tmp_path / name).write_text("not moeprune's\n")
        rc, _, err = run_cli(capsys, *args, "--force")
        assert_user_error(rc, err, "not a moeprune file")
        assert (tmp_path / name).read_text() == "not moeprune's\n"
    assert _hidden(tmp_path) == []


def test_a_second_run_into_a_locked_output_fails_at_once(lm, tmp_path, capsys, monkeypatch):
    import moeprune.calibrate as calibrate

    m, d, prof = lm["model"], lm["data"], lm["profile"]

    def never(*args, **kwargs):
        raise AssertionError("calibrated although its output is locked")

    monkeypatch.setattr(calibrate, "calibrate", never)
    cases = [
        ["profile", m, "--data", d, "--out", tmp_path / "x.profile.safetensors"],
        ["report", prof, "--out", tmp_path / "report"],
        ["compare", m, "--profile", prof, "--task", d, "--out", tmp_path / "cmp"],
        ["library", "build", m, "--task", f"a={d}", "--keep", "6", "--out", tmp_path / "lib"],
        ["plan", prof, "-m", "frequency", "-k", "6", "--out", tmp_path / "plan.json"],
        ["eval", m, "--task", d, "--output", tmp_path / "eval.json"],
        ["prune", m, "--data", d, "-m", "frequency", "-k", "6", "--out", tmp_path / "one"],
    ]
    for args in cases:
        out = Path(args[args.index("--out" if "--out" in args else "--output") + 1])
        lock = outputs._Lock(out, "--out", str(out))  # what a first run into ``out`` holds
        lock.acquire()
        try:
            rc, _, err = run_cli(capsys, *args)
        finally:
            lock.release()
        assert_user_error(rc, err, "another moeprune run", f"pid {os.getpid()}")
        assert not out.exists(), args
    assert _hidden(tmp_path) == []


def test_read_only_outputs_are_found_before_any_work(lm, tmp_path, capsys, monkeypatch):
    import moeprune.calibrate as calibrate
    import moeprune.evaluate.runners as runners

    m, d, prof = lm["model"], lm["data"], lm["profile"]

    def never(*args, **kwargs):
        raise AssertionError("worked although its output is read-only")

    monkeypatch.setattr(calibrate, "calibrate", never)
    monkeypatch.setattr(runners, "evaluate", never)
    ro = tmp_path / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    for args in (
        ["profile", m, "--data", d, "--out", ro / "x.profile.safetensors"],
        ["plan", prof, "-m", "frequency", "-k", "6", "--out", ro / "plan.json"],
        ["eval", m, "--task", d, "--output", ro / "eval.json"],
        ["compare", m, "--profile", prof, "--task", d, "--out", ro / "cmp"],
        ["report", prof, "--out", ro / "report"],
        ["library", "build", m, "--task", f"a={d}", "--keep", "6", "--out", ro / "lib"],
        ["prune", m, "--data", d, "-m", "frequency", "-k", "6", "--out", ro / "one"],
        ["profile", "merge", prof, prof, "--out", ro / "m.profile.safetensors"],
    ):
        rc, _, err = run_cli(capsys, *args)
        assert_user_error(rc, err, "read-only")
    assert list(ro.iterdir()) == []


def test_temporaries_of_killed_runs_are_removed_by_the_next(lm, tmp_path, capsys):
    m, d = lm["model"], lm["data"]
    dead = _dead_pid()
    host = outputs._host()
    cases = [
        ("one", ["prune", m, "--data", d, "-m", "frequency", "-k", "6", "--out", tmp_path / "one"]),
        ("lib", ["library", "build", m, "--task", f"a={d}", "--keep", "6", "-q", "--out", tmp_path / "lib"]),
        ("eval.json", ["eval", m, "--task", d, "--output", tmp_path / "eval.json"]),
        ("p.profile.safetensors", ["profile", m, "--data", d, "-q", "--out", tmp_path / "p.profile.safetensors"]),
    ]
    for name, args in cases:
        stale = tmp_path / f".{name}.moeprune-tmp-{host}-{dead}-0badc0de"
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"partial")
        rc, _, err = run_cli(capsys, *args)
        assert rc == 0, err
        assert not stale.exists(), name
    assert _hidden(tmp_path) == []


def test_oneshot_logs_name_final_paths(lm, tmp_path, capsys):
    m, d = lm["model"], lm["data"]
    out = tmp_path / "one"
    rc, stdout, err = run_cli(capsys, "prune", m, "--data", d, "-m", "frequency", "-k", "6", "--out", out)
    assert rc == 0, err
    assert ".moeprune-" not in stdout + err and "/work/" not in err
    assert f"wrote {out / 'moeprune' / 'profile.safetensors'}" in err
    assert (out / "moeprune" / "profile.safetensors").is_file()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["profiles"][0]["path"] == str(out.resolve() / "moeprune" / "profile.safetensors")


def test_oneshot_on_a_full_disk_is_refused_before_calibrating(lm, tmp_path, capsys, monkeypatch):
    import moeprune.calibrate as calibrate

    def never(*args, **kwargs):
        raise AssertionError("calibrated although the disk is too full for the output")

    class Full:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(calibrate, "calibrate", never)
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: Full())
    args = ["prune", lm["model"], "--data", lm["data"], "-m", "frequency", "-k", "6", "--out", tmp_path / "one"]
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "needs", "free")
    assert list(tmp_path.iterdir()) == []
