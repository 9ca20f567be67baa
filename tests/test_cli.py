"""The command line as a whole: every registered command's options read the same way (-o/--out on
every output, one --device and --dtype, flags without a type in --help) and `moeprune --version`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.core import TyperOption

import moeprune
from _cli import assert_user_error, run_cli
from moeprune.cli import _register_commands, app
from moeprune.device import DEVICE_HELP, DTYPE_HELP, check_device, resolve_device, resolve_dtype
from moeprune.errors import UserError


def _commands() -> Iterator[tuple[list[str], Any]]:
    """(path, click command) of every leaf command, e.g. (['library', 'build'], <command>)."""
    _register_commands()

    def walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        subs = getattr(command, "commands", None)
        if subs is None:
            yield path, command
            return
        for name, sub in subs.items():
            yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


COMMANDS = list(_commands())


def _options(command: Any) -> list[TyperOption]:
    return [p for p in command.params if isinstance(p, TyperOption)]


def test_every_command_is_walked():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"eval", "plan", "prune", "compare", "search", "report", "profile create", "profile merge"} <= names
    assert {"library build", "library route", "generate", "chat", "run", "inspect"} <= names


def test_every_output_option_is_out_with_short_o():
    outputs = []
    for path, command in COMMANDS:
        for opt in _options(command):
            if opt.name in ("out", "output"):
                outputs.append(" ".join(path))
                assert "-o" in opt.opts and "--out" in opt.opts, (path, opt.opts)
    # every command that writes a file or folder named by an option
    assert sorted(outputs) == sorted(
        ["eval", "plan", "prune", "export", "compare", "search", "report", "generate", "profile create",
         "profile merge", "library build", "library route"]
    )  # fmt: skip


def test_no_two_options_of_a_command_share_a_name():
    for path, command in COMMANDS:
        names = [n for p in command.params for n in [*p.opts, *getattr(p, "secondary_opts", [])]]
        assert len(names) == len(set(names)), (path, sorted(names))


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS] + [[]], ids=lambda p: " ".join(p) or "moeprune")
def test_help_shows_no_type_after_a_flag(path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc, out, _ = run_cli(capsys, *path, "--help")
    assert rc == 0 and "--help" in out
    assert "<bool>" not in out and "BOOLEAN" not in out, out
    assert "--help" in out.split("Show this message")[0].splitlines()[-1]


def test_flags_have_no_metavar():
    import typer._click as click

    flags = 0
    for path, command in COMMANDS:
        ctx = click.Context(command)
        for opt in _options(command):
            if opt.is_flag:
                flags += 1
                assert opt.display_type_rich(ctx) is None, (path, opt.opts)
                assert opt.get_help_record(ctx)[0].split()[-1].startswith("-"), (path, opt.opts)
            else:
                assert opt.display_type_rich(ctx), (path, opt.opts)  # an option that takes a value says so
    assert flags > 10


def _shared(name: str) -> dict[str, tuple[Any, str]]:
    return {
        " ".join(path): (opt.default, opt.help)
        for path, command in COMMANDS
        for opt in _options(command)
        if opt.name == name
    }


def test_every_device_option_is_the_same():
    devices = _shared("device")
    assert set(devices) == {
        "eval", "compare", "search", "generate", "chat", "profile create", "library build", "library route"
    }  # fmt: skip
    assert set(devices.values()) == {("auto", DEVICE_HELP)}, devices


def test_every_dtype_option_is_the_same():
    dtypes = _shared("dtype")
    assert set(dtypes) == set(_shared("device"))
    assert set(dtypes.values()) == {("auto", DTYPE_HELP)}, dtypes


def test_auto_dtype_is_bf16_on_cpus_with_bf16_units(monkeypatch):
    import moeprune.device as device

    amx = "processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n"
    avx = "flags\t\t: fpu avx512f avx512_bf16\n"
    plain = "flags\t\t: fpu sse avx2 avx512f\nbugs\t\t: amx_bf16\n"  # only the flags line counts
    assert device.cpu_flags_have_bf16(amx) and device.cpu_flags_have_bf16(avx)
    assert not device.cpu_flags_have_bf16(plain) and not device.cpu_flags_have_bf16("")
    monkeypatch.setenv("MOEPRUNE_CPU_BF16", "1")
    assert resolve_dtype("auto", "cpu") == "bfloat16" and resolve_dtype("float32", "cpu") == "float32"
    monkeypatch.setenv("MOEPRUNE_CPU_BF16", "0")
    assert resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.delenv("MOEPRUNE_CPU_BF16")
    monkeypatch.setattr(device, "_cpuinfo_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(device, "_cpuinfo_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("auto", "cuda") == "bfloat16"


def test_auto_dtype_keeps_narrow_models_in_float32_on_bf16_cpus(monkeypatch):
    """With bf16 units, `auto` gives bfloat16 only to models of hidden size >= CPU_BF16_MIN_HIDDEN
    (narrow ones run faster in float32 there), read from a transformers config or a config.json
    dict, the text model's for multimodal ones; without a width it keeps bfloat16. CUDA and CPUs
    without the units are unchanged, and an explicit dtype is never overridden."""
    from transformers import Qwen3MoeConfig

    import moeprune.device as device

    narrow = Qwen3MoeConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    wide = Qwen3MoeConfig(hidden_size=2048, num_attention_heads=4, num_key_value_heads=2)
    edge = device.CPU_BF16_MIN_HIDDEN
    monkeypatch.setenv("MOEPRUNE_CPU_BF16", "1")
    assert resolve_dtype("auto", "cpu", narrow) == "float32"
    assert resolve_dtype("auto", "cpu", wide) == "bfloat16"
    assert resolve_dtype("auto", "cpu", {"model_type": "x", "hidden_size": edge - 1}) == "float32"
    assert resolve_dtype("auto", "cpu", {"model_type": "x", "hidden_size": edge}) == "bfloat16"
    assert resolve_dtype("auto", "cpu", {"text_config": {"hidden_size": 256}}) == "float32"
    assert resolve_dtype("auto", "cpu", {"text_config": {"hidden_size": 4096}}) == "bfloat16"
    for unknown in (None, {}, {"hidden_size": "128"}, {"hidden_size": True}):
        assert resolve_dtype("auto", "cpu", unknown) == "bfloat16"
    assert resolve_dtype("auto", "cuda", narrow) == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu", narrow) == "bfloat16"
    monkeypatch.setenv("MOEPRUNE_CPU_BF16", "0")
    assert resolve_dtype("auto", "cpu", wide) == "float32"


def test_one_device_and_dtype_resolution():
    import moeprune.evaluate.loading as loading
    import moeprune.profiling as profiling

    assert profiling.resolve_device is resolve_device and loading.resolve_device is resolve_device
    assert resolve_device("auto") in ("cpu", "cuda") and resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") == "float32"  # conftest: MOEPRUNE_CPU_BF16=0
    assert resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("bf16", "cpu") == "bfloat16" and resolve_dtype("float16", "cuda") == "float16"
    check_device("cuda:3")  # by name; whether it exists is checked when resolved
    for bad in ("tpu", "cudax", "cuda:", "gpu"):
        with pytest.raises(UserError, match="unknown device"):
            check_device(bad)
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    rc, out, err = run_cli(capsys, flag)
    assert rc == 0 and err == ""
    first, second = out.strip().splitlines()
    assert first == f"moeprune {moeprune.__version__}"
    import torch
    import transformers

    assert f"torch {torch.__version__}" in second and f"transformers {transformers.__version__}" in second


def test_version_imports_no_torch():
    code = (
        "import sys\nfrom moeprune.cli import main\nrc = main(['--version'])\n"
        "assert rc == 0 and 'torch' not in sys.modules and 'transformers' not in sys.modules, rc"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"moeprune {moeprune.__version__}\n")


def test_bad_device_and_dtype_are_one_line(capsys, tmp_path):
    from moeprune.testbed import MODEL_DIR

    lib = tmp_path / "lib"
    for args, word in (
        (["--device", "tpu"], "unknown device"),
        (["--dtype", "float8"], "unknown dtype"),
    ):
        rc, _, err = run_cli(capsys, "eval", MODEL_DIR, "--task", "testbed:dates", "--limit", "1", *args)
        assert_user_error(rc, err, word)
        rc, _, err = run_cli(
            capsys, "library", "build", MODEL_DIR, "--task", f"a={MODEL_DIR / 'config.json'}", "--keep", "8",
            "--out", lib, *args,
        )  # fmt: skip
        assert_user_error(rc, err, word)
        assert not lib.exists()
