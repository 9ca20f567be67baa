#!/usr/bin/env python
"""Hostile-input and fault audit of the moeprune command line (issue 11), re-runnable.

Builds a scratch folder with a small valid setup (a tiny DeepSeek-V3 and a tiny Qwen3-MoE
checkpoint with a byte tokenizer, calibration data, a profile, a plan, a library, a recipe and a
pruned output, all made by moeprune itself), then runs every case below as a
``python -m moeprune ...`` subprocess (timeout, memory cap) in its own copy of that setup, and
classifies the outcome:

  ok               the expected outcome: a valid run succeeded with a loadable, finite output,
                   or a bad input ended in exit 2 with exactly one ``moeprune: error:`` line,
                   nothing written and every file of the case folder unchanged
  traceback        "Traceback" on stderr, or an exit code outside {0, 2, 130}
  garbage-success  exit 0 on a bad input, or an output that does not load / holds NaN
  data-loss        an input, an unrelated file or an existing output modified or deleted, or
                   two concurrent runs that both "succeed" into one folder
  leftover         temporary or partial files left beside the output once the run is over
                   (after SIGTERM/SIGKILL: once a clean re-run is over)
  hang / oom       the timeout, or the memory cap (RLIMIT_AS), ended the run
  unsafe           a network connection, a followed symlink, remote code copied without a
                   word, unescaped text from a file in a model card / report
  unclean-error    exit 2 without exactly one ``moeprune: error:`` line on stderr
  refused          a valid input rejected (exit 2)

    python scripts/fault_audit.py                 # everything (-j 2), tables per category
    python scripts/fault_audit.py --only signal   # the cases whose name or category matches
    python scripts/fault_audit.py --json out.json --keep

Disk-full and read-only cases mount small tmpfs folders (root only); without root they fall
back to a file-size limit (RLIMIT_FSIZE) and a chmod'ed folder and say so in the category name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

MEM_CAP = 6 << 30  # RLIMIT_AS of every run
TIMEOUT = 120  # seconds per run
CLASSES = (
    "traceback", "garbage-success", "data-loss", "leftover", "hang", "oom", "unsafe",
    "unclean-error", "refused",
)  # fmt: skip
IS_ROOT = os.geteuid() == 0
# the class a defective case is counted under: its worst
SEVERITY = ("audit-error", "data-loss", "hang", "oom", "garbage-success", "unsafe", "traceback", "leftover", "unclean-error", "refused")  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Cases as data
# ---------------------------------------------------------------------------------------------

Setup = Callable[[Path], None]
Check = Callable[["Run"], list[tuple[str, str]]]


@dataclasses.dataclass
class Case:
    """One audited run. ``argv`` is formatted with the case folder's paths: {model} {qwen}
    {data} {em} {profile} {qprofile} {plan} {lib} {pruned} {recipe} {out} {wd}.
    ``expect``: "ok" (success + valid output), "error" (clean exit 2), "either" (one of the two),
    "interrupted" (a signal case: old output intact or a valid new one)."""

    name: str
    category: str
    setup: Setup | None
    argv: list[str]
    expect: str
    out: str = "out"  # relative to the case folder; None-like "" when the command writes nothing
    kind: str = "none"  # validator of the output: model, profile, plan, json, dir, compare, library, none
    signal: tuple[int, float | str] | None = None  # (signal, seconds or "tmp": when a temp appears)
    concurrent: int = 1
    check: Check | None = None
    timeout: float = TIMEOUT
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    kept_on_error: bool = False  # a failed run keeps the output it finished (valid, not partial)


@dataclasses.dataclass
class Run:
    case: Case
    wd: Path
    rc: int | None = None
    rcs: list[int | None] = dataclasses.field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    defects: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    network: int = 0
    note: str = ""


CASES: list[Case] = []


def case(name, category, argv, expect, setup=None, **kw) -> None:
    CASES.append(Case(name, category, setup, argv, expect, **kw))


def P(*argv: str) -> list[str]:
    """argv of ``moeprune`` split on spaces (arguments with spaces: pass a list)."""
    return [a for part in argv for a in part.split(" ")]


# -- file helpers used by the setups ----------------------------------------------------------


def st_read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_write(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)


def st_header(fn: Callable[[dict], None], file: str = "model/model.safetensors") -> Setup:
    def setup(wd: Path) -> None:
        header, data = st_read(wd / file)
        fn(header)
        st_write(wd / file, header, data)

    return setup


def expert_key(header: dict, part: str = "experts.0.gate_proj") -> str:
    return next(k for k in header if part in k)


def set_tensor(key_part: str, **fields) -> Callable[[dict], None]:
    def fn(h: dict) -> None:
        h[expert_key(h, key_part)].update(fields)

    return fn


def raw_edit(fn: Callable[[bytes], bytes], file: str) -> Setup:
    def setup(wd: Path) -> None:
        p = wd / file
        p.write_bytes(fn(p.read_bytes()))

    return setup


def write(file: str, content: str | bytes) -> Setup:
    def setup(wd: Path) -> None:
        p = wd / file
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8", errors="surrogatepass")

    return setup


def json_edit(file: str, fn: Callable[[dict], object]) -> Setup:
    def setup(wd: Path) -> None:
        p = wd / file
        d = json.loads(p.read_text())
        r = fn(d)
        p.write_text(json.dumps(d if r is None else r))

    return setup


def cfg(**fields) -> Setup:
    return json_edit("model/config.json", lambda d: d.update(fields))


def tensors_edit(file: str, fn: Callable[[dict], None]) -> Setup:
    """Load a safetensors file as torch tensors, let ``fn`` change them, save it with the same
    metadata."""

    def setup(wd: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        p = wd / file
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        fn(t)
        save_file(t, str(p), metadata=meta)

    return setup


def profile_meta(fn: Callable[[dict], None], file: str = "p.profile.safetensors") -> Setup:
    def setup(wd: Path) -> None:
        header, data = st_read(wd / file)
        meta = json.loads(header["__metadata__"]["meta"])
        fn(meta)
        header["__metadata__"]["meta"] = json.dumps(meta)
        st_write(wd / file, header, data)

    return setup


def flip_bit(file: str, tensor: str) -> Setup:
    """Flip one mantissa bit of the first element of ``tensor`` (a plausible value, as a bad
    disk or a bad copy would make)."""

    def setup(wd: Path) -> None:
        header, data = st_read(wd / file)
        start = header[tensor]["data_offsets"][0]
        b = bytearray(data)
        b[start + 5] ^= 0x10
        st_write(wd / file, header, bytes(b))

    return setup


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def chain(*setups: Setup) -> Setup:
    def setup(wd: Path) -> None:
        for s in setups:
            s(wd)

    return setup


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- mounts: tmpfs folders for disk-full and read-only cases ----------------------------------

MOUNTS: list[Path] = []
MOUNT_LOCK = threading.Lock()


def _mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not IS_ROOT:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if r.returncode != 0:
        return False
    with MOUNT_LOCK:
        MOUNTS.append(path)
    return True


def disk(folder: str, size: str = "1m", fill: bool = True, copy: tuple[str, ...] = ()) -> Setup:
    """``folder`` becomes a tmpfs of ``size`` holding copies of ``copy``; ``fill`` fills what is
    left with a filler file (the disk is full before the run starts)."""

    def setup(wd: Path) -> None:
        p = wd / folder
        if not _mount(p, size):
            return  # file-size limit instead, set in preexec (category says so)
        for c in copy:
            src = wd / c
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, p / src.name)
        if fill:
            with contextlib.suppress(OSError), open(p / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)

    return setup


def read_only(folder: str, copy: tuple[str, ...] = ()) -> Setup:
    def setup(wd: Path) -> None:
        p = wd / folder
        mounted = _mount(p, "4m")
        for c in copy:
            src = wd / c
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, p / src.name)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(p)], check=True)
        else:
            os.chmod(p, 0o555)

    return setup


def unmount_all() -> None:
    with MOUNT_LOCK:
        for p in reversed(MOUNTS):
            subprocess.run(["umount", "-l", str(p)], capture_output=True)
        MOUNTS.clear()


# -- checks beyond the generic ones -----------------------------------------------------------


def no_file_with(text_of: str, pattern: str = "**/*") -> Check:
    """unsafe if the output holds a file whose content equals the file ``text_of`` (absolute)."""

    def check(run: Run) -> list[tuple[str, str]]:
        target = Path(text_of).read_bytes() if Path(text_of).exists() else None
        out = run.wd / run.case.out
        if target is None or not out.is_dir():
            return []
        for f in out.glob(pattern):
            if f.is_file() and f.read_bytes() == target:
                return [("unsafe", f"{f.name} in the output is a copy of {text_of} (symlink followed)")]
        return []

    return check


def remote_code_check(run: Run) -> list[tuple[str, str]]:
    out = run.wd / run.case.out
    if not out.is_dir():
        return []
    py = sorted(f.name for f in out.glob("*.py"))
    cfgf = out / "config.json"
    auto_map = cfgf.exists() and "auto_map" in cfgf.read_text()
    card = (out / "README.md").read_text(errors="replace").lower() if (out / "README.md").exists() else ""
    if (py or auto_map) and "remote code" not in card and "trust_remote_code" not in card:
        return [("unsafe", f"remote code copied silently ({', '.join(py) or 'auto_map'}), not in the card")]
    return []


def no_text_in_output(*needles: str) -> Check:
    def check(run: Run) -> list[tuple[str, str]]:
        out = run.wd / run.case.out
        files = [out] if out.is_file() else list(out.rglob("*")) if out.is_dir() else []
        for f in files:
            if f.is_file() and f.suffix in (".md", ".html", ".txt"):  # rendered text, not JSON data
                text = f.read_text(errors="replace")
                for n in needles:
                    if n in text:
                        return [("unsafe", f"{f.name} holds unescaped {n!r} from an input file")]
        return []

    return check


def no_marker(name: str) -> Check:
    def check(run: Run) -> list[tuple[str, str]]:
        return [("unsafe", f"{name} exists: code from an input ran")] if (run.wd / name).exists() else []

    return check


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

PROFILE_RUN = "profile {model} --data {data} -q --out {out}"
PRUNE_RUN = "prune {model} --plan {plan} --out {out}"
EVAL_RUN = "eval {model} --task {data} --limit 2 --output {out}"
COMPARE_RUN = "compare {model} -p {profile} -t {data} -m easyep -k 0.5 --no-novice --limit 2 --out {out}"
LIB_RUN = "library build {model} --task a={data} --task b={profile} --keep 4 -q --out {out}"
REPORT_RUN = "report {profile} --out {out}"
PLAN_RUN = "plan {profile} -m easyep -k 0.5 --out {out}"
ROUTE_RUN = ["library", "route", "{lib}", "1 + 3 = ", "--model", "{model}"]

# 0. controls: valid runs must succeed (a failure here is a broken audit or a regression)
C = "control"
case("control-profile", C, P(PROFILE_RUN), "ok", out="out.profile.safetensors", kind="profile")
case("control-profile-qwen", C, P("profile {qwen} --data {data} -q --out {out}"), "ok", out="out-q.profile.safetensors", kind="profile")  # fmt: skip
case("control-plan", C, P(PLAN_RUN), "ok", out="out.json", kind="plan")
case("control-prune", C, P(PRUNE_RUN), "ok", kind="model")
case("control-prune-novice", C, P(PRUNE_RUN + " --mode novice --profile {profile}"), "ok", kind="model")
case(
    "control-prune-oneshot",
    C,
    P("prune {model} --data {data} -m easyep -k 0.5 --out {out}"),
    "ok",
    kind="model",
)
case("control-prune-force-existing", C, P("prune {model} --plan {plan} --out {pruned} --force"), "ok", out="pruned", kind="model")  # fmt: skip
case("control-inspect", C, P("inspect {model} --json"), "ok", out="")
case("control-eval", C, P(EVAL_RUN), "ok", out="out.json", kind="json")
case("control-compare", C, P(COMPARE_RUN), "ok", kind="dir")
case("control-report", C, P(REPORT_RUN), "ok", kind="dir")
case("control-library-build", C, P(LIB_RUN), "ok", kind="library")
case("control-library-route", C, ROUTE_RUN, "ok", out="")
case("control-library-show", C, P("library show {lib}"), "ok", out="")
case("control-merge", C, P("profile merge {profile} {profile} --out {out}"), "ok", out="m.profile.safetensors", kind="profile")  # fmt: skip
case("control-run-recipe", C, P("run {recipe} -q"), "ok", out="rec", kind="model")
case("control-model-on-readonly", C, P("prune {wd}/ro/model --plan {plan} --out {out}"), "ok", setup=read_only("ro", ("model",)), kind="model")  # fmt: skip

# 1. --force at an input, a parent of it, an unrelated folder (issue 1)
C = "force-out"
SANDBOX = write("sandbox/notes/keep.txt", "an unrelated file tree\n")
for cmd, argv in {
    "compare": COMPARE_RUN, "report": REPORT_RUN, "library-build": LIB_RUN, "prune": PRUNE_RUN,
}.items():  # fmt: skip
    base = argv.replace(" --out {out}", "")
    case(f"force-{cmd}-at-model", C, P(base + " --out {model} --force"), "error", out="model")
    case(f"force-{cmd}-at-parent", C, P(base + " --out {wd} --force"), "error", out=".")
    case(f"force-{cmd}-at-unrelated", C, P(base + " --out {wd}/sandbox --force"), "error", setup=SANDBOX, out="sandbox")  # fmt: skip
    case(f"out-{cmd}-inside-model", C, P(base + " --out {model}/sub"), "error", out="model/sub")
case("force-report-at-profile-file", C, P("report {profile} --out {profile} --force"), "error", out="p.profile.safetensors")  # fmt: skip
case("force-run-recipe-out-is-model", C, P("run {wd}/bad.yaml --force"), "error", out="model", setup=write("bad.yaml", "model: model\ndata: [data.jsonl]\nmethod: easyep\nkeep: 0.5\nout: model\n"))  # fmt: skip
case("force-compare-over-own-output", C, P(COMPARE_RUN.replace("{out}", "{wd}/cmp") + " --force"), "ok", out="cmp", kind="dir")  # fmt: skip
case("force-library-over-own-output", C, P(LIB_RUN.replace("{out}", "{lib}") + " --force"), "ok", out="lib", kind="library")  # fmt: skip

# 4. output over a file the command reads (issue 4)
C = "out-over-input"
case("profile-out-model-weights", C, P(PROFILE_RUN.replace("{out}", "{model}/model.safetensors")), "error", out="model/model.safetensors")  # fmt: skip
case("profile-out-model-config", C, P(PROFILE_RUN.replace("{out}", "{model}/config.json")), "error", out="model/config.json")  # fmt: skip
case("profile-out-data", C, P(PROFILE_RUN.replace("{out}", "{data}")), "error", out="data.jsonl")
case(
    "plan-out-model-config",
    C,
    P(PLAN_RUN.replace("{out}", "{model}/config.json")),
    "error",
    out="model/config.json",
)
case("plan-out-profile", C, P(PLAN_RUN.replace("{out}", "{profile}")), "error", out="p.profile.safetensors")
case("eval-output-model-config", C, P(EVAL_RUN.replace("{out}", "{model}/config.json")), "error", out="model/config.json")  # fmt: skip
case("eval-output-data", C, P(EVAL_RUN.replace("{out}", "{data}")), "error", out="data.jsonl")
case("merge-out-first-input", C, P("profile merge {profile} {qprofile} --out {profile}"), "error", out="p.profile.safetensors")  # fmt: skip
case(
    "route-output-model-config",
    C,
    ROUTE_RUN + ["-o", "{model}/config.json"],
    "error",
    out="model/config.json",
)
case("prune-out-plan-file", C, P("prune {model} --plan {plan} --out {plan}"), "error", out="plan.json")

# 2, 14, 15. signals
C = "signal"
SIGS = {"int": signal.SIGINT, "term": signal.SIGTERM, "kill": signal.SIGKILL}
SIGNAL_CMDS = {
    "prune-force": ("prune {model} --plan {plan} --out {pruned} --force", "pruned", "model", (0.5, 2, "tmp")),
    "oneshot-force": (
        "prune {model} --data {data} -m easyep -k 0.5 --out {pruned} --force",
        "pruned",
        "model",
        ("tmp",),
    ),  # fmt: skip
    "profile": (PROFILE_RUN, "out.profile.safetensors", "profile", (0.5, "tmp")),
    "compare": (COMPARE_RUN, "out", "dir", ("tmp",)),
    "library-build": (LIB_RUN.replace("{out}", "{lib}") + " --force", "lib", "library", ("tmp",)),
    "run-recipe": ("run {recipe} -q --force", "rec", "model", ("tmp",)),
}
for cmd, (argv, out, kind, times) in SIGNAL_CMDS.items():
    for sname, sig in SIGS.items():
        for t in times:
            case(f"sig{sname}-{cmd}-{t}", C, P(argv), "interrupted", out=out, kind=kind, signal=(sig, t))

# 3. concurrency
C = "concurrent"
case("concurrent-prune-same-out", C, P(PRUNE_RUN), "one-wins", kind="model", concurrent=2)
case("concurrent-oneshot-same-out", C, P("prune {model} --data {data} -m easyep -k 0.5 --out {out}"), "one-wins", kind="model", concurrent=2)  # fmt: skip
case("concurrent-library-same-out", C, P(LIB_RUN), "one-wins", kind="library", concurrent=2)
case("concurrent-report-same-out", C, P(REPORT_RUN), "one-wins", kind="dir", concurrent=2)
case("concurrent-prune-force-same-out", C, P("prune {model} --plan {plan} --out {pruned} --force"), "all-ok", out="pruned", kind="model", concurrent=2)  # fmt: skip

# 5, 11. corrupted safetensors
C = "corrupt-weights"
WEIGHTS = {
    "truncated-half": raw_edit(lambda b: b[: len(b) // 2], "model/model.safetensors"),
    "truncated-in-header": raw_edit(lambda b: b[:40], "model/model.safetensors"),
    "empty": write("model/model.safetensors", b""),
    "bad-header-json": raw_edit(lambda b: b[:8] + b"{not json" + b[17:], "model/model.safetensors"),
    "header-len-huge": raw_edit(lambda b: (1 << 60).to_bytes(8, "little") + b[8:], "model/model.safetensors"),
    "dtype-F99": st_header(set_tensor("experts.0.gate_proj", dtype="F99")),
    "shape-bytes-mismatch": st_header(set_tensor("experts.0.gate_proj", shape=[64, 64])),
    "shape-transposed": st_header(set_tensor("experts.0.gate_proj", shape=[64, 32])),
    "offsets-past-end": st_header(set_tensor("experts.7.up_proj", data_offsets=[0, 1 << 40])),
    "missing-expert-tensor": st_header(lambda h: h.pop(expert_key(h, "experts.3.down_proj"))),
    "extra-tensor": tensors_edit(
        "model/model.safetensors", lambda t: t.update(extra_weight=t[next(iter(t))].clone())
    ),  # fmt: skip
    "dtype-int8-expert": tensors_edit(
        "model/model.safetensors",
        lambda t: t.update({k: t[k].to(torch_dtype("int8")) for k in list(t) if "experts.1.up_proj" in k}),
    ),  # fmt: skip
}
for what, setup in WEIGHTS.items():
    case(f"weights-{what}-prune", C, P(PRUNE_RUN), "error", setup=setup)
    case(f"weights-{what}-profile", C, P(PROFILE_RUN), "error", setup=setup, out="out.profile.safetensors")
for what in ("truncated-half", "empty", "bad-header-json", "dtype-F99"):
    case(f"weights-{what}-inspect", C, P("inspect {model}"), "either", setup=WEIGHTS[what], out="")
for what in ("truncated-half", "bad-header-json", "shape-transposed"):
    case(f"weights-{what}-eval", C, P(EVAL_RUN), "error", setup=WEIGHTS[what], out="out.json")
case("weights-dtype-F99-library-build", C, P(LIB_RUN), "error", setup=WEIGHTS["dtype-F99"])

# 7, 11. configs that disagree with the weights or make no sense
C = "corrupt-config"
CONFIGS = {
    "layers-4-of-2": cfg(num_hidden_layers=4),
    "layers-1-of-2": cfg(num_hidden_layers=1),
    "experts-16-of-8": cfg(n_routed_experts=16),
    "experts-4-of-8": cfg(n_routed_experts=4),
    "hidden-128-of-64": cfg(hidden_size=128),
    "experts-negative": cfg(n_routed_experts=-8),
    "experts-string": cfg(n_routed_experts="8"),
    "experts-zero": cfg(n_routed_experts=0),
    "experts-2pow40": cfg(n_routed_experts=2**40),
    "topk-16-of-8": cfg(num_experts_per_tok=16),
    "topk-zero": cfg(num_experts_per_tok=0),
    "non-utf8": raw_edit(
        lambda b: b.replace(b'"deepseek_v3"', b'"deepseek_v3\xff\xfe"'), "model/config.json"
    ),
    "deeply-nested": write("model/config.json", '{"model_type": "deepseek_v3", "x": ' + nested(100000) + "}"),
    "not-json": write("model/config.json", "model_type = deepseek_v3\n"),
    "json-list": write("model/config.json", "[1, 2]"),
    "unknown-model-type": cfg(model_type="nonexistent_moe"),
    "missing": lambda wd: (wd / "model/config.json").unlink(),
}
for what, setup in CONFIGS.items():
    case(f"config-{what}-profile", C, P(PROFILE_RUN), "error", setup=setup, out="out.profile.safetensors")
    # inspect reads the config only (by design): it cannot see a config that disagrees with the weights
    config_only = what in (
        "layers-4-of-2",
        "experts-16-of-8",
        "experts-4-of-8",
        "hidden-128-of-64",
        "experts-2pow40",
    )
    case(
        f"config-{what}-inspect",
        C,
        P("inspect {model}"),
        "either" if config_only else "error",
        setup=setup,
        out="",
    )
for what in (
    "layers-4-of-2",
    "experts-16-of-8",
    "hidden-128-of-64",
    "experts-negative",
    "experts-zero",
    "non-utf8",
):
    case(f"config-{what}-prune", C, P(PRUNE_RUN), "error", setup=CONFIGS[what])
for what in ("layers-4-of-2", "topk-16-of-8"):
    case(f"config-{what}-eval", C, P(EVAL_RUN), "error", setup=CONFIGS[what], out="out.json")
case("config-experts-16-of-8-library-build", C, P(LIB_RUN), "error", setup=CONFIGS["experts-16-of-8"])

# 6. NaN / Inf
C = "nan"


def _poison(value: float, part: str) -> Setup:
    def fn(t: dict) -> None:
        for k in t:
            if part in k:
                t[k].view(-1)[0] = value

    return tensors_edit("model/model.safetensors", fn)


def _nan_profile(name: str, value: float = math.nan) -> Setup:
    return tensors_edit("p.profile.safetensors", lambda t: t[name].view(-1).__setitem__(0, value))


case("nan-weights-profile", C, P(PROFILE_RUN), "error", setup=_poison(math.nan, "experts.2.down_proj"), out="out.profile.safetensors")  # fmt: skip
case("inf-weights-profile", C, P(PROFILE_RUN), "error", setup=_poison(math.inf, "experts.2.up_proj"), out="out.profile.safetensors")  # fmt: skip
case("nan-router-profile", C, P(PROFILE_RUN), "error", setup=_poison(math.nan, "mlp.gate.weight"), out="out.profile.safetensors")  # fmt: skip
case("nan-weights-eval", C, P(EVAL_RUN), "error", setup=_poison(math.nan, "embed_tokens"), out="out.json")
case("nan-weights-oneshot", C, P("prune {model} --data {data} -m easyep -k 0.5 --out {out}"), "error", setup=_poison(math.nan, "mlp.gate.weight"))  # fmt: skip
case("nan-mone-mean-novice", C, P(PRUNE_RUN + " --mode novice --profile {profile}"), "error", setup=_nan_profile("mone_mean"))  # fmt: skip
case("nan-easyep-plan", C, P(PLAN_RUN), "error", setup=_nan_profile("easyep"), out="out.json")
case("inf-count-plan-frequency", C, P("plan {profile} -m frequency -k 0.5 --out {out}"), "error", setup=_nan_profile("count", math.inf), out="out.json")  # fmt: skip
case("nan-easyep-report", C, P(REPORT_RUN), "error", setup=_nan_profile("easyep"))
case("nan-profile-compare", C, P(COMPARE_RUN), "error", setup=_nan_profile("gate"))
case("nan-profile-library", C, P(LIB_RUN), "error", setup=_nan_profile("premoe_hist_f"))

# 8. profiles
C = "corrupt-profile"
PROFILES = {
    "bit-flip-easyep": flip_bit("p.profile.safetensors", "easyep"),
    "bit-flip-count": flip_bit("p.profile.safetensors", "count"),
    "negative-count": _nan_profile("count", -5.0),
    "negative-tokens": _nan_profile("tokens", -131.0),
    "truncated": raw_edit(lambda b: b[: len(b) // 2], "p.profile.safetensors"),
    "empty": write("p.profile.safetensors", b""),
    "meta-not-json": st_header(lambda h: h["__metadata__"].update(meta="{oops"), "p.profile.safetensors"),
    "meta-missing": st_header(lambda h: h.pop("__metadata__"), "p.profile.safetensors"),
    "meta-experts-2pow70": profile_meta(lambda m: m.update(num_experts=2**70)),
    "meta-experts-negative": profile_meta(lambda m: m.update(num_experts=-8)),
    "meta-deeply-nested": profile_meta(lambda m: m.update(routing={"x": json.loads(nested(900))})),
    # per-token PreMoe entries are only in a `--premoe-exact` profile (the kit's pe.profile...)
    "premoe-idx-99": chain(
        lambda wd: shutil.copyfile(wd / "pe.profile.safetensors", wd / "p.profile.safetensors"),
        tensors_edit("p.profile.safetensors", lambda t: t["premoe_idx"].view(-1).__setitem__(0, 99)),
    ),
    "count-wrong-shape": tensors_edit(
        "p.profile.safetensors", lambda t: t.update(count=t["count"][:, :4].clone())
    ),
}
for what, setup in PROFILES.items():
    case(f"profile-{what}-plan", C, P(PLAN_RUN), "error", setup=setup, out="out.json")
for what in ("bit-flip-easyep", "negative-count"):
    case(f"profile-{what}-report", C, P(REPORT_RUN), "error", setup=PROFILES[what])
case("profile-premoe-idx-99-plan-premoe", C, P("plan {profile} -m premoe -k 0.5 --out {out}"), "error", setup=PROFILES["premoe-idx-99"], out="out.json")  # fmt: skip
case("profile-other-model-novice", C, P(PRUNE_RUN + " --mode novice --profile {qprofile}"), "error")
case("profile-other-model-compare", C, P(COMPARE_RUN.replace("{profile}", "{qprofile}")), "error")
case("profile-other-model-library", C, P(LIB_RUN.replace("{profile}", "{qprofile}")), "error")
case("profile-other-model-merge", C, P("profile merge {profile} {qprofile} --out {out}"), "error", out="m.profile.safetensors")  # fmt: skip
case("profile-ka-above-stored-plan", C, P("plan {profile} -m premoe -k 0.5 --premoe-ka 64 --out {out}"), "error", out="out.json")  # fmt: skip

# 12, 18. plans
C = "corrupt-plan"


def _plan(fn: Callable[[dict], object]) -> Setup:
    return json_edit("plan.json", fn)


PLANS = {
    "id-99": _plan(lambda d: d["kept"].update({"1": [1, 2, 4, 99]})),
    "id-negative": _plan(lambda d: d["kept"].update({"1": [-1, 2, 4, 7]})),
    "id-duplicate": _plan(lambda d: d["kept"].update({"1": [2, 2, 4, 7]})),
    "id-string": _plan(lambda d: d["kept"].update({"1": ["1", "2", "4", "7"]})),
    "id-float": _plan(lambda d: d["kept"].update({"1": [1.5, 2, 4, 7]})),
    "layer-not-moe": _plan(lambda d: d["kept"].update({"0": [1, 2]})),
    "layer-99": _plan(lambda d: d["kept"].update({"99": [1, 2]})),
    "kept-empty": _plan(lambda d: d["kept"].update({"1": []})),
    "num-experts-2pow70": _plan(lambda d: d.update(num_experts=2**70)),
    "num-experts-negative": _plan(lambda d: d.update(num_experts=-8)),
    "top-k-zero": _plan(lambda d: d.update(top_k=0)),
    "top-k-1000": _plan(lambda d: d.update(top_k=1000)),
    "format-unknown": _plan(lambda d: d.update(format="moeprune-plan/99")),
    "not-json": write("plan.json", "kept: everything\n"),
    "json-list": write("plan.json", "[]"),
    "deeply-nested": write("plan.json", '{"kept": ' + nested(100000) + "}"),
    "non-utf8": write("plan.json", b'{"format": "\xff\xfe"}'),
    "other-model": lambda wd: shutil.copy2(wd / "qplan.json", wd / "plan.json"),
    "profile-path-outside": _plan(lambda d: d["settings"]["profiles"][0].update(path="/etc/hostname")),
}
for what, setup in PLANS.items():
    expect = "either" if what == "profile-path-outside" else "error"
    case(f"plan-{what}-prune", C, P(PRUNE_RUN), expect, setup=setup, kind="model")
case("plan-num-experts-2pow70-novice", C, P(PRUNE_RUN + " --mode novice --profile {profile}"), "error", setup=PLANS["num-experts-2pow70"])  # fmt: skip
INJECT = "easyep\n\n# Injected heading\n<script>alert(1)</script> [x](javascript:alert(1))"
case("plan-method-markdown-prune", C, P(PRUNE_RUN), "either", setup=_plan(lambda d: d.update(method=INJECT)), kind="model", check=no_text_in_output("<script>", "\n# Injected heading"))  # fmt: skip

# 9, 11. libraries
C = "corrupt-library"


def _lib(fn: Callable[[dict], object]) -> Setup:
    return json_edit("lib/library.json", fn)


def _lib_task(**fields) -> Setup:
    return _lib(lambda d: d["tasks"][0].update(fields))


LIBS = {
    "nan-keys": tensors_edit(
        "lib/keys.safetensors", lambda t: [v.fill_(math.nan) for k, v in t.items() if k.startswith("a.key")]
    ),  # fmt: skip
    "inf-keys": tensors_edit(
        "lib/keys.safetensors", lambda t: [v.fill_(math.inf) for k, v in t.items() if k.startswith("b.key")]
    ),  # fmt: skip
    "plan-path-outside": chain(
        lambda wd: shutil.copy2(wd / "lib/plans/a.plan.json", wd / "outside.plan.json"),
        _lib_task(plan="../outside.plan.json"),
    ),  # fmt: skip
    "plan-path-absolute": _lib_task(plan="/etc/hostname"),
    "premoe-ka-zero": _lib(lambda d: d.update(premoe_ka=0)),
    "premoe-ka-1e9": _lib(lambda d: d.update(premoe_ka=10**9)),
    "premoe-ka-negative": _lib(lambda d: d.update(premoe_ka=-1)),
    "keep-2pow70": _lib(lambda d: d.update(keep=2**70)),
    "num-experts-2pow70": _lib(lambda d: d.update(num_experts=2**70)),
    "duplicate-task-names": _lib(lambda d: d["tasks"].__setitem__(1, {**d["tasks"][1], "name": "a"})),
    "no-tasks": _lib(lambda d: d.update(tasks=[])),
    "truncated-json": raw_edit(lambda b: b[: len(b) // 2], "lib/library.json"),
    "keys-missing": lambda wd: (wd / "lib/keys.safetensors").unlink(),
    "keys-wrong-shape": tensors_edit(
        "lib/keys.safetensors", lambda t: t.update({"a.key.first": t["a.key.first"][:4].clone()})
    ),  # fmt: skip
    "deeply-nested": write(
        "lib/library.json", '{"format": "moeprune-library/1", "tasks": ' + nested(100000) + "}"
    ),
}
for what, setup in LIBS.items():
    case(f"library-{what}-route", C, ROUTE_RUN, "error", setup=setup, out="")
for what in ("nan-keys", "plan-path-outside", "premoe-ka-1e9", "duplicate-task-names"):
    case(f"library-{what}-show", C, P("library show {lib}"), "error", setup=LIBS[what], out="")
    case(f"library-{what}-generate", C, ["generate", "{model}", "--library", "{lib}", "--prompt", "1 + 3 = ", "--max-new-tokens", "2"], "error", setup=LIBS[what], out="")  # fmt: skip
case("library-build-premoe-ka-zero", C, P(LIB_RUN + " --premoe-ka 0"), "error")
case("library-build-premoe-ka-1e9", C, P(LIB_RUN + " --premoe-ka 1000000000"), "error")
case("library-build-keep-1e9", C, P(LIB_RUN.replace("--keep 4", "--keep 1000000000")), "error")

# 19, 11. recipes
C = "corrupt-recipe"
RECIPE_OK = "model: model\ndata: [data.jsonl]\nmethod: easyep\nkeep: 0.5\nout: rec\n"
RECIPES = {
    "duplicate-keys": RECIPE_OK + "keep: 0.75\n",
    "deeply-nested": "model: model\nx: " + nested(100000) + "\n",
    "not-a-mapping": "- model\n- data\n",
    "empty": "",
    "unknown-key": RECIPE_OK + "kep: 0.5\n",
    "keep-string": RECIPE_OK.replace("0.5", "lots"),
    "keep-2pow70": RECIPE_OK.replace("0.5", str(2**70)),
    "python-tag": RECIPE_OK + "seed: !!python/object/apply:os.system ['touch PWNED']\n",
    "billion-laughs": RECIPE_OK
    + 'lol: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"l{i}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)),
    "out-is-data": RECIPE_OK.replace("out: rec", "out: data.jsonl"),
    "model-missing": RECIPE_OK.replace("model: model", "model: nowhere"),
}
for what, text in RECIPES.items():
    case(f"recipe-{what}-run", C, P("run {wd}/r.yaml -q"), "error", setup=write("r.yaml", text), out="rec", check=no_marker("PWNED"))  # fmt: skip
case("recipe-non-utf8-run", C, P("run {wd}/r.yaml -q"), "error", setup=write("r.yaml", RECIPE_OK.encode() + b"# \xff\xfe\n"), out="rec")  # fmt: skip

# 11, 13. calibration and evaluation data
C = "corrupt-data"
DATA = {
    "empty": "",
    "blank-lines": "\n\n  \n",
    "malformed-json": '{"text": "ok"}\n{"text": "unterminated\n',
    "lone-surrogate": '{"text": "a \\ud800 b"}\n{"text": "fine"}\n',
    "missing-field": '{"foo": "bar"}\n{"foo": "baz"}\n',
    "text-is-number": '{"text": 42}\n',
    "text-is-null": '{"text": null}\n',
    "json-array-line": "[1, 2, 3]\n",
    "deeply-nested-line": '{"text": ' + nested(100000) + "}\n",
    "binary": b"\x00\x01\x02\xff\xfe" * 100,
    "non-utf8": b'{"text": "caf\xe9"}\n',
}
for what, content in DATA.items():
    expect = "either" if what == "lone-surrogate" else "error"
    case(f"data-{what}-profile", C, P(PROFILE_RUN.replace("{data}", "{wd}/bad.jsonl")), expect, setup=write("bad.jsonl", content), out="out.profile.safetensors", kind="profile")  # fmt: skip
    if what in ("empty", "malformed-json", "lone-surrogate", "missing-field", "deeply-nested-line"):
        case(f"data-{what}-eval", C, P(EVAL_RUN.replace("{data}", "{wd}/bad.jsonl")), expect, setup=write("bad.jsonl", content), out="out.json", kind="json")  # fmt: skip
case("data-missing-file-profile", C, P(PROFILE_RUN.replace("{data}", "{wd}/nowhere.jsonl")), "error", out="out.profile.safetensors")  # fmt: skip
case("data-is-folder-profile", C, P(PROFILE_RUN.replace("{data}", "{wd}/lib")), "error", out="out.profile.safetensors")  # fmt: skip
case("data-mc-label-out-of-range-eval", C, P(EVAL_RUN.replace("{data}", "{wd}/mc.jsonl")), "error", setup=write("mc.jsonl", '{"prompt": "q", "choices": ["a", "b"], "label": 5}\n'), out="out.json")  # fmt: skip
case("data-lone-surrogate-library", C, P(LIB_RUN.replace("{data}", "{wd}/bad.jsonl")), "either", setup=write("bad.jsonl", DATA["lone-surrogate"]), kind="library")  # fmt: skip

# 12, 13. huge inputs (memory cap 6 GB, timeout)
C = "huge"
BIG = '{"text": "' + "lorem ipsum " * (20_000_000 // 12) + '"}\n{"text": "short"}\n'
case("huge-20MB-line-profile", C, P(PROFILE_RUN.replace("{data}", "{wd}/big.jsonl") + " --max-length 64"), "either", setup=write("big.jsonl", BIG), out="out.profile.safetensors", kind="profile", timeout=180)  # fmt: skip
case("huge-20MB-line-eval", C, P(EVAL_RUN.replace("{data}", "{wd}/big.jsonl") + " --max-length 64"), "either", setup=write("big.jsonl", BIG), out="out.json", kind="json", timeout=180)  # fmt: skip
case(
    "huge-plan-experts-2pow70-prune", C, P(PRUNE_RUN), "error", setup=PLANS["num-experts-2pow70"], timeout=90
)
case("huge-config-layers-1e9-inspect", C, P("inspect {model}"), "either", setup=cfg(num_hidden_layers=10**9), out="", timeout=90)  # fmt: skip
case("huge-config-experts-1e12-profile", C, P(PROFILE_RUN), "error", setup=cfg(n_routed_experts=10**12), out="out.profile.safetensors", timeout=90)  # fmt: skip
case("huge-max-samples-profile", C, P(PROFILE_RUN + " --max-samples 1000000000000"), "either", out="out.profile.safetensors", kind="profile")  # fmt: skip

# 10. disk full (tmpfs; without root a file-size limit)
C = "disk-full" if IS_ROOT else "file-size-limit"
FULL_CASES = {
    "profile": (PROFILE_RUN, "full/out.profile.safetensors"),
    "plan": (PLAN_RUN, "full/out.json"),
    "prune": (PRUNE_RUN, "full/out"),
    "oneshot": ("prune {model} --data {data} -m easyep -k 0.5 --out {out}", "full/out"),
    "eval": (EVAL_RUN, "full/out.json"),
    "compare": (COMPARE_RUN, "full/out"),
    "report": (REPORT_RUN, "full/out"),
    "library-build": (LIB_RUN, "full/out"),
    "merge": ("profile merge {profile} {profile} --out {out}", "full/m.profile.safetensors"),
    "route-output": (" ".join(ROUTE_RUN).replace("1 + 3 = ", "x") + " -o {out}", "full/r.json"),
}
for cmd, (argv, out) in FULL_CASES.items():
    case(f"full-{cmd}", C, P(argv), "error", setup=disk("full", "1m", fill=True), out=out, env={"FSIZE": "1"})
    if cmd in ("prune", "oneshot", "library-build", "profile", "compare"):
        # compare's report in mask mode (no model written) is ~35 KB: it fits, and must be whole
        fits = cmd == "compare"
        case(f"small-{cmd}", C, P(argv), "either" if fits else "error", setup=disk("full", "64k", fill=False), out=out, env={"FSIZE": "65536"}, kind="compare" if fits else "none")  # fmt: skip

# 10. read-only output folder
C = "read-only" if IS_ROOT else "read-only-chmod"
for cmd, (argv, out) in FULL_CASES.items():
    case(f"ro-{cmd}", C, P(argv), "error", setup=read_only("full"), out=out)
case("ro-run-recipe", C, P("run {wd}/r.yaml -q"), "error", setup=chain(read_only("full"), write("r.yaml", RECIPE_OK.replace("out: rec", "out: full/rec"))), out="full/rec")  # fmt: skip

# 16, 17, 18. security
C = "security"
HOSTNAME = "/etc/hostname"


def _link(name: str, target: str) -> Setup:
    return lambda wd: os.symlink(target, wd / "model" / name)


def _remote_code(wd: Path) -> None:
    (wd / "model/modeling_evil.py").write_text("import os\nos.system('touch PWNED')\n")
    (wd / "model/configuration_evil.py").write_text("import os\nos.system('touch PWNED')\n")
    d = json.loads((wd / "model/config.json").read_text())
    d["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (wd / "model/config.json").write_text(json.dumps(d))


case("symlink-etc-hostname-prune", C, P(PRUNE_RUN), "either", setup=_link("notes.txt", HOSTNAME), kind="model", check=no_file_with(HOSTNAME))  # fmt: skip
case("symlink-readme-hostname-prune", C, P(PRUNE_RUN), "either", setup=_link("README.md", HOSTNAME), kind="model", check=no_file_with(HOSTNAME))  # fmt: skip
case("symlink-etc-hostname-oneshot", C, P("prune {model} --data {data} -m easyep -k 0.5 --out {out}"), "either", setup=_link("notes.txt", HOSTNAME), kind="model", check=no_file_with(HOSTNAME))  # fmt: skip
case("symlink-tokenizer-outside-prune", C, P(PRUNE_RUN), "either", setup=chain(lambda wd: shutil.move(wd / "model/tokenizer.json", wd / "tok.json"), _link("tokenizer.json", "../tok.json")), kind="model")  # fmt: skip
case("remote-code-prune", C, P(PRUNE_RUN), "either", setup=_remote_code, kind="model", check=lambda r: remote_code_check(r) + no_marker("PWNED")(r))  # fmt: skip
case("remote-code-profile", C, P(PROFILE_RUN), "either", setup=_remote_code, out="out.profile.safetensors", kind="profile", check=no_marker("PWNED"))  # fmt: skip
case(
    "remote-code-inspect",
    C,
    P("inspect {model}"),
    "either",
    setup=_remote_code,
    out="",
    check=no_marker("PWNED"),
)
case("lm-eval-offline", C, P("eval {model} --lm-eval hellaswag --limit 2 --output {out}"), "either", out="out.json", kind="json", timeout=120, kept_on_error=True)  # fmt: skip
case("hub-id-not-cached-inspect", C, P("inspect no-such-org/no-such-model-xyz"), "error", out="")
case("hub-id-not-cached-profile", C, P("profile no-such-org/no-such-model-xyz --data {data} -q --out {out}"), "error", out="out.profile.safetensors")  # fmt: skip
case("task-name-markup-compare", C, P(COMPARE_RUN.replace("-t {data}", "-t <b>x</b>={data}")), "either", kind="dir", check=no_text_in_output("<b>x</b>"))  # fmt: skip
case("data-name-markup-report", C, P("report {wd}/<img src=x onerror=alert(1)>.profile.safetensors --out {out}"), "either", setup=lambda wd: shutil.copy2(wd / "p.profile.safetensors", wd / "<img src=x onerror=alert(1)>.profile.safetensors"), kind="dir", check=no_text_in_output("<img src=x"))  # fmt: skip

# ---------------------------------------------------------------------------------------------
# The kit (built once) and running one case
# ---------------------------------------------------------------------------------------------


def moeprune(argv: list[str], cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "moeprune", *argv], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"building the kit failed: moeprune {' '.join(argv)}\n{r.stderr}")


ARTIFACTS = ("{profile}", "{qprofile}", "{plan}", "{lib}", "{pruned}", "{recipe}")


def needs_artifacts(cases: list[Case]) -> bool:
    """Whether any case needs the kit's profiles, plans, library or pruned output (setups may
    read any of them), or only the models and data (a quick kit)."""
    return any(c.setup or any(a in arg for arg in c.argv for a in ARTIFACTS) for c in cases)


def build_kit(kit: Path, artifacts: bool = True) -> None:
    """The valid setup every case starts from (relative paths only, so copies stay valid)."""
    from transformers.utils import logging as hf_logging

    import moeprune.testing.tiny as tiny
    from moeprune.testing.tiny import byte_tokenizer

    hf_logging.disable_progress_bar()

    kit.mkdir(parents=True)
    for model_type, name in (("deepseek_v3", "model"), ("qwen3_moe", "qwen")):
        m = tiny.tiny_model(model_type)
        m.config.eos_token_id, m.config.pad_token_id, m.config.bos_token_id = 2, 0, 1
        m.generation_config.eos_token_id, m.generation_config.pad_token_id = 2, 0
        m.save_pretrained(kit / name)
        byte_tokenizer().save_pretrained(kit / name)
    lines = [f"{i} + {3 * i} = {4 * i} alpha beta" for i in range(6)]
    (kit / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (kit / "em.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i} + {3 * i} = ", "answer": str(4 * i)}) + "\n" for i in range(3))
    )
    (kit / "recipe.yaml").write_text(RECIPE_OK)
    # three rounds; the steps of one round are independent and run side by side
    rounds = [
        ["profile model --data data.jsonl -q --out p.profile.safetensors",
         "profile qwen --data data.jsonl -q --out q.profile.safetensors",
         "profile model --data data.jsonl -q --premoe-exact --out pe.profile.safetensors"],
        ["plan p.profile.safetensors -m easyep -k 0.5 --out plan.json",
         "plan q.profile.safetensors -m easyep -k 0.5 --out qplan.json",
         "prune model --data data.jsonl -m easyep -k 0.5 --out pruned"],
        ["library build model --task a=data.jsonl --task b=p.profile.safetensors --keep 4 -q --out lib"],
    ]  # fmt: skip
    for steps in rounds if artifacts else []:
        with ThreadPoolExecutor(len(steps)) as pool:
            list(pool.map(lambda step: moeprune(step.split(" "), kit), steps))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (symlinks not followed): path -> (kind, digest or target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                try:
                    out[rel] = ("file", hashlib.sha1(p.read_bytes()).hexdigest())
                except OSError as e:
                    out[rel] = ("unreadable", str(e))
    return out


class NetTrap:
    """A local TCP listener set as every proxy of a run: any connection means the run tried to
    reach the network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.hits = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        self.sock.close()


def _limits(fsize: int | None) -> Callable[[], None]:
    def preexec() -> None:
        os.setsid()
        # a background parent (nohup, `&`) ignores SIGINT, and exec keeps an ignored signal
        # ignored: give the run Python's own Ctrl-C handling, as in a terminal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() returns EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return preexec


def _paths(wd: Path, out: str) -> dict[str, str]:
    names = {
        "model": "model", "qwen": "qwen", "data": "data.jsonl", "em": "em.jsonl",
        "profile": "p.profile.safetensors", "qprofile": "q.profile.safetensors", "plan": "plan.json",
        "lib": "lib", "pruned": "pruned", "recipe": "recipe.yaml", "out": out or "unused-out",
    }  # fmt: skip
    return {k: str(wd / v) for k, v in names.items()} | {"wd": str(wd)}


def _start(case: Case, wd: Path, logs: Path, i: int, trap: NetTrap) -> tuple[subprocess.Popen, Path, Path]:
    argv = [a.format(**_paths(wd, case.out)) for a in case.argv]
    env = dict(os.environ, HTTP_PROXY=trap.url, HTTPS_PROXY=trap.url, ALL_PROXY=trap.url,
               http_proxy=trap.url, https_proxy=trap.url, NO_PROXY="", no_proxy="",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)  # moeprune itself must not go online; do not hide it
    fsize = int(case.env["FSIZE"]) if "FSIZE" in case.env and not MOUNTS_OK else None
    out_f, err_f = logs / f"{case.name}.{i}.out", logs / f"{case.name}.{i}.err"
    with open(out_f, "wb") as o, open(err_f, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moeprune", *argv], cwd=wd, env=env, stdin=subprocess.DEVNULL,
            stdout=o, stderr=e, preexec_fn=_limits(fsize),
        )  # fmt: skip
    return proc, out_f, err_f


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _deliver(proc: subprocess.Popen, wd: Path, sig: int, when: float | str, timeout: float) -> None:
    """Send ``sig`` after ``when`` seconds, or when a hidden temp entry appears in the case folder
    (or the output's parent)."""
    t0 = time.monotonic()
    if when == "tmp":
        before = set(os.listdir(wd))
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            new = set(os.listdir(wd)) - before
            if any(n.startswith(".") or "moeprune" in n or n.endswith((".tmp", ".partial")) for n in new):
                break
            time.sleep(0.01)
    else:
        while proc.poll() is None and time.monotonic() - t0 < float(when):
            time.sleep(0.01)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def execute(case: Case, root: Path, kit: Path) -> Run:
    wd = root / "cases" / case.name
    logs = root / "logs"
    shutil.copytree(kit, wd, symlinks=True)
    run = Run(case, wd)
    try:
        if case.setup:
            case.setup(wd)
        before = snapshot(wd)
        trap = NetTrap()
        t0 = time.monotonic()
        started = [_start(case, wd, logs, i, trap) for i in range(case.concurrent)]
        if case.signal:
            _deliver(started[0][0], wd, case.signal[0], case.signal[1], case.timeout)
        run.rcs = [_wait(p, case.timeout) for p, _, _ in started]
        run.seconds = time.monotonic() - t0
        run.rc = run.rcs[0]
        run.stdout = "".join(o.read_text(errors="replace") for _, o, _ in started)
        run.stderr = "\n".join(e.read_text(errors="replace") for _, _, e in started)
        after = snapshot(wd)
        classify(run, before, after)
        if case.signal and case.signal[0] != signal.SIGINT:
            rerun_cleans(run, root, kit, trap)
        trap.close()
        run.network = trap.hits
        if trap.hits:
            run.defects.append(("unsafe", f"{trap.hits} network connection(s) attempted"))
        if case.check:
            run.defects += case.check(run)
        run.defects.sort(key=lambda d: SEVERITY.index(d[0]) if d[0] in SEVERITY else 0)
    except Exception as e:  # an audit bug must not stop the audit; it is reported as such
        run.defects.append(("audit-error", f"{type(e).__name__}: {e}"))
    return run


def rerun_cleans(run: Run, root: Path, kit: Path, trap: NetTrap) -> None:
    """After SIGTERM/SIGKILL: the same command again (no signal) must succeed and leave no
    leftovers of the killed run (stale temp folders cleaned by a later run)."""
    leftovers = [d for d in run.defects if d[0] == "leftover"]
    run.defects = [d for d in run.defects if d[0] != "leftover"]
    proc, _, err_f = _start(run.case, run.wd, root / "logs", 9, trap)
    rc = _wait(proc, run.case.timeout)
    out = run.wd / run.case.out
    stale = _new_hidden(out)
    if rc != 0:
        run.defects.append(("traceback" if "Traceback" in err_f.read_text(errors="replace") else "refused",
                            f"re-run after the signal: exit {rc}"))  # fmt: skip
    if stale:
        run.defects.append(("leftover", f"after a clean re-run still: {', '.join(stale)}"))
    elif leftovers:
        run.note = "killed run left temp files; the re-run cleaned them"


def _new_hidden(out: Path) -> list[str]:
    parent = out.parent
    if not parent.is_dir():
        return []
    return sorted(n for n in os.listdir(parent) if "moeprune" in n and n != out.name)


# ---------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------


def _under(rel: str, out: str) -> bool:
    if out == ".":
        return True
    return bool(out) and (rel == out or rel.startswith(out + "/"))


def clean_error(stderr: str) -> bool:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return len(lines) == 1 and lines[0].startswith("moeprune: error:")


MEM_WORDS = ("MemoryError", "bad_alloc", "Cannot allocate memory", "out of memory", "DefaultCPUAllocator")


def classify(run: Run, before: dict, after: dict) -> None:
    case, d = run.case, run.defects
    out = case.out
    if any(rc is None for rc in run.rcs):
        d.append(("hang", f"no exit within {case.timeout:.0f} s"))
        return
    if (
        any(w in run.stderr for w in MEM_WORDS)
        or any(rc in (-signal.SIGKILL,) for rc in run.rcs)
        and not case.signal
    ):
        d.append(("oom", "the memory cap ended the run"))
    expected_signal_rc = {0, 2, 130}
    if case.signal and case.signal[0] != signal.SIGINT:
        expected_signal_rc |= {-case.signal[0], 128 + case.signal[0]}
    if "Traceback" in run.stderr:
        d.append(("traceback", _last_line(run.stderr)))
    elif any(rc not in expected_signal_rc for rc in run.rcs) and not any(c == "oom" for c, _ in d):
        d.append(("traceback", f"exit code {run.rcs}: {_last_line(run.stderr)}"))

    changed = _changes(before, after, out)
    new = _new_entries(before, after, out)
    out_path = run.wd / out if out else None
    valid = _valid(case.kind, out_path) if out_path is not None and case.kind != "none" else None

    if case.expect in ("error", "ok", "either"):
        success = run.rc == 0
        if case.expect == "error" and success:
            d.append(("garbage-success", "exit 0 on a bad input"))
        if success and valid is not None and valid is not True:
            d.append(("garbage-success", f"output {out}: {valid}"))
        if run.rc == 2 and not clean_error(run.stderr) and "Traceback" not in run.stderr:
            d.append(("unclean-error", _first_lines(run.stderr)))
        if case.expect == "ok" and run.rc == 2:
            d.append(("refused", _last_line(run.stderr)))
        if not success:  # nothing written, nothing changed
            if changed:
                d.append(("data-loss", "changed/deleted: " + ", ".join(changed[:4])))
            partial = [n for n in after if _under(n, out) and n not in before] if out else []
            if case.kept_on_error and partial:
                partial = [] if valid is True else [f"{out} ({valid})"]
            if new or partial:
                d.append(("leftover", "left behind: " + ", ".join((new + partial)[:4])))
        else:
            if changed and not (case.expect != "error" and all(_under(c, out) for c in changed)):
                d.append(("data-loss", "changed/deleted: " + ", ".join(changed[:4])))
            if new:
                d.append(("leftover", "left behind: " + ", ".join(new[:4])))
    elif case.expect == "interrupted":
        old_intact = {k: v for k, v in before.items() if _under(k, out)} == {
            k: v for k, v in after.items() if _under(k, out)
        }
        if not old_intact and valid is not True:
            d.append(("data-loss", f"{out}: neither the old output nor a valid new one ({valid})"))
        others = [c for c in changed if not _under(c, out)]
        if others:
            d.append(("data-loss", "changed/deleted: " + ", ".join(others[:4])))
        if new:
            d.append(("leftover", "left behind: " + ", ".join(new[:4])))
    elif case.expect in ("one-wins", "all-ok"):
        oks = sum(rc == 0 for rc in run.rcs)
        if case.expect == "one-wins" and oks > 1:
            d.append(("data-loss", f"{oks} concurrent runs into one --out all reported success"))
        if oks == 0:
            d.append(("refused", "no concurrent run succeeded"))
        bad = [rc for rc in run.rcs if rc not in (0, 2)]
        # only the refused runs must print one line (a winner prints its progress)
        if any(rc == 2 for rc in run.rcs) and not all(
            clean_error(e) for rc, e in zip(run.rcs, _split_stderr(run), strict=False) if rc == 2
        ):  # fmt: skip
            d.append(("unclean-error", _first_lines(run.stderr)))
        if valid is not True and not bad:
            d.append(("garbage-success", f"output {out}: {valid}"))
        others = [c for c in changed if not _under(c, out)]
        if others:
            d.append(("data-loss", "changed/deleted: " + ", ".join(others[:4])))
        if new:
            d.append(("leftover", "left behind: " + ", ".join(new[:4])))


def _split_stderr(run: Run) -> list[str]:
    return [e.read_text(errors="replace") for e in sorted((run.wd.parent.parent / "logs").glob(f"{run.case.name}.[0-8].err"))]  # fmt: skip


def _changes(before: dict, after: dict, out: str) -> list[str]:
    return sorted(k for k, v in before.items() if k not in after or (v[0] != "dir" and after[k] != v))


def _new_entries(before: dict, after: dict, out: str) -> list[str]:
    """New entries outside the output, top-most only."""
    new = sorted(k for k in after if k not in before and not (out and _under(k, out)))
    tops = [k for k in new if not any(k.startswith(t + "/") for t in new if t != k)]
    return tops


def _last_line(s: str) -> str:
    lines = [ln for ln in s.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no stderr)"


def _first_lines(s: str) -> str:
    lines = [ln for ln in s.strip().splitlines() if ln.strip()]
    return " | ".join(lines[:2])[:200] + (f" (+{len(lines) - 2} lines)" if len(lines) > 2 else "")


VALIDATE = threading.Lock()


def _finite(t) -> bool:
    import torch

    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _valid(kind: str, path: Path) -> bool | str:
    """True, or why the output is not valid."""
    if not path.exists():
        return "missing"
    with VALIDATE:
        try:
            if kind == "model":
                import moeprune

                model = moeprune.load(str(path))
                bad = [n for n, p in model.state_dict().items() if not _finite(p)]
                return True if not bad else f"non-finite tensor {bad[0]}"
            if kind == "profile":
                from safetensors.torch import load_file

                from moeprune.profile import Profile

                Profile.load(path)
                bad = [k for k, t in load_file(str(path)).items() if not _finite(t)]
                return True if not bad else f"non-finite tensor {bad[0]}"
            if kind == "plan":
                kept = json.loads(path.read_text())["kept"]
                return True if kept and all(kept.values()) else "empty plan"
            if kind == "json":
                text = path.read_text()
                json.loads(text)
                return True if not re.search(r"\bNaN\b|Infinity", text) else "NaN in results"
            if kind == "library":
                from moeprune.library import Library

                Library.load(path)
                return True
            if kind == "dir":
                return True if path.is_dir() and any(path.iterdir()) else "empty folder"
            if kind == "compare":  # every file of the report, and its results parse
                files = ("results.json", "results.csv", "results.md")
                missing = [f for f in files if not (path / f).is_file()]
                if missing:
                    return "missing " + ", ".join(missing)
                json.loads((path / "results.json").read_text())
                return True
        except BaseException as e:  # noqa: BLE001 - any failure to load is the finding
            return f"does not load: {type(e).__name__}: {str(e)[:120]}"
    return True


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

MOUNTS_OK = IS_ROOT


def _probe_mount(root: Path) -> bool:
    p = root / "probe"
    ok = _mount(p, "64k")
    if ok:
        unmount_all()
    return ok


def report(runs: list[Run]) -> str:
    cats: dict[str, list[Run]] = {}
    for r in runs:
        cats.setdefault(r.case.category, []).append(r)
    classes = [*CLASSES, "audit-error"]
    head = f"{'category':<18}{'runs':>5}{'ok':>5}{'clean':>6}" + "".join(f"{c[:9]:>10}" for c in classes)
    lines = [head, "-" * len(head)]

    def row(name: str, rs: list[Run]) -> str:
        ok = [r for r in rs if not r.defects]
        clean = sum(1 for r in ok if r.rc == 2)
        counts = [sum(1 for r in rs if r.defects and r.defects[0][0] == c) for c in classes]
        return f"{name:<18}{len(rs):>5}{len(ok):>5}{clean:>6}" + "".join(f"{n:>10}" for n in counts)

    for name, rs in cats.items():
        lines.append(row(name, rs))
    lines += ["-" * len(head), row("total", runs)]
    bad = [r for r in runs if r.defects]
    lines.append(
        f"\n{len(runs)} runs tried, {len(runs) - len(bad)} ok (expected) of which "
        f"{sum(1 for r in runs if not r.defects and r.rc == 2)} clean errors; {len(bad)} defective "
        "(counted by their first defect; columns: the first defect's class)"
    )
    if bad:
        lines.append("\nDefective cases:")
        for r in bad:
            desc = "; ".join(f"{c}: {m}" for c, m in r.defects)
            lines.append(f"  {r.case.name} [exit {r.rcs if len(r.rcs) > 1 else r.rc}] {desc}"[:400])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global MOUNTS_OK
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="run the cases whose name matches this glob, or of this category (repeatable)")  # fmt: skip
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write every case's result here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (printed)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)

    cases = CASES
    if args.only:
        cases = [c for c in CASES if any(fnmatch.fnmatch(c.name, p) or p == c.category for p in args.only)]
    if args.list:
        print("\n".join(f"{c.category:<18}{c.name}" for c in cases))
        return 0
    if not cases:
        print("no case matches", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="moeprune-audit-"))
    (root / "logs").mkdir()
    t0 = time.monotonic()
    try:
        MOUNTS_OK = _probe_mount(root)
        build_kit(root / "kit", needs_artifacts(cases))
        kit_before = snapshot(root / "kit")
        print(f"kit built in {time.monotonic() - t0:.0f} s; {len(cases)} cases, -j {args.jobs}", flush=True)
        runs: list[Run] = []
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(execute, c, root, root / "kit") for c in cases]
            for fut in as_completed(futures):
                run = fut.result()
                runs.append(run)
                status = "ok" if not run.defects else ",".join(sorted({c for c, _ in run.defects}))
                print(f"[{len(runs):>3}/{len(cases)}] {run.case.name:<48} exit {run.rc!s:>4} {run.seconds:5.1f}s  {status}", flush=True)  # fmt: skip
        runs.sort(key=lambda r: cases.index(r.case))
        if snapshot(root / "kit") != kit_before:
            print("WARNING: the shared kit changed during the audit", file=sys.stderr)
        print()
        print(report(runs))
        print(f"\n{time.monotonic() - t0:.0f} s in all")
        if args.json:
            args.json.write_text(json.dumps([_as_json(r) for r in runs], indent=1))
    finally:
        unmount_all()
        if args.keep:
            print(f"scratch kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if any(r.defects for r in runs) else 0


def _as_json(r: Run) -> dict:
    return {
        "name": r.case.name, "category": r.case.category, "argv": r.case.argv, "expect": r.case.expect,
        "exit": r.rcs if len(r.rcs) > 1 else r.rc, "seconds": round(r.seconds, 2),
        "ok": not r.defects, "defects": [{"class": c, "detail": m} for c, m in r.defects],
        "note": r.note, "stderr_tail": r.stderr[-1500:],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
