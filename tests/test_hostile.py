"""Garbage in: corrupt checkpoints and configs that disagree with their weights are one clear line,
exit 2, in every command that reads them (issue 11 #5, #7, #11)."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from _cli import assert_user_error, run_cli
from moeprune.errors import UserError
from moeprune.testing.tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("m") / "m"
    tiny_model("qwen3_moe").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def plan_file(model_dir, tmp_path_factory) -> Path:
    from _cli import run_cli as _run  # noqa: F401 - same helper, without capsys
    from moeprune.cli import main

    d = tmp_path_factory.mktemp("p")
    (d / "d.jsonl").write_text("".join(json.dumps({"text": f"hello {i} " * 5}) + "\n" for i in range(4)))
    assert (
        main(
            ["profile", str(model_dir), "--data", str(d / "d.jsonl"), "--out", str(d / "p.safetensors"), "-q"]
        )
        == 0
    )
    assert (
        main(
            [
                "plan",
                str(d / "p.safetensors"),
                "--method",
                "easyep",
                "--keep",
                "4",
                "--out",
                str(d / "plan.json"),
            ]
        )
        == 0
    )
    return d / "plan.json"


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(model_dir, dst)
    return dst


def _edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors header in place (same length, so the data stays where it was)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new + b" " * (n - len(new)) + raw[8 + n :])


def _edit_config(d: Path, **values) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in values.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


UP3 = "model.layers.0.mlp.experts.3.up_proj.weight"


def _set(key, field, value):
    def edit(h):
        h[key][field] = value

    return edit


@pytest.mark.parametrize(
    "edit, words",
    [
        (_set(UP3, "dtype", "F99"), ["unknown dtype 'F99'", UP3, "model.safetensors"]),
        (_set(UP3, "shape", [64, 32]), [UP3, "[64, 32]", "[32, 64]"]),
        (
            _set("model.layers.0.mlp.gate.weight", "shape", [4, 128]),
            ["mlp.gate.weight", "[4, 128]", "[8, 64]"],
        ),
        (
            lambda h: h[UP3].update(
                data_offsets=h["model.layers.0.mlp.experts.2.up_proj.weight"]["data_offsets"]
            ),
            ["overlap", UP3],
        ),
        (_set(UP3, "shape", [32, -64]), ["negative dimension", UP3]),
    ],
)
def test_prune_refuses_a_corrupt_header(model_dir, plan_file, tmp_path, capsys, edit, words):
    src = _copy(model_dir, tmp_path)
    _edit_header(src / "model.safetensors", edit)
    rc, _, err = run_cli(capsys, "prune", src, "--plan", plan_file, "--out", tmp_path / "out")
    assert_user_error(rc, err, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad-header", "entry-removed", "trailing-bytes"])
@pytest.mark.parametrize("command", ["profile", "eval", "inspect"])
def test_corrupt_weights_file(model_dir, tmp_path, capsys, damage, command):
    """entry-removed: a header entry gone leaves a gap that safetensors refuses when it loads
    ("invalid offset": a traceback in profile, issue 11 #11)."""
    src = _copy(model_dir, tmp_path)
    f = src / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "entry-removed":
        _edit_header(f, lambda h: h.pop(UP3))
    elif damage == "trailing-bytes":
        f.write_bytes(f.read_bytes() + b"\0" * 64)
    else:
        f.write_bytes(struct.pack("<Q", 16) + b"{bad header!!!!}")
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    args = {
        "profile": ["profile", src, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "p.safetensors"],
        "eval": ["eval", src, "--task", tmp_path / "d.jsonl"],
        "inspect": ["inspect", src],
    }[command]
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "model.safetensors", "is not a valid safetensors file")


@pytest.mark.parametrize(
    "change, words",
    [
        (
            {"num_hidden_layers": 4, "mlp_only_layers": None, "layer_types": None},
            ["missing keys", "model.layers.2."],
        ),
        ({"num_experts": 16, "num_local_experts": None}, ["config"]),
        ({"moe_intermediate_size": 16}, ["config"]),
    ],
)
@pytest.mark.parametrize("command", ["profile", "eval"])
def test_config_that_disagrees_with_the_weights(model_dir, tmp_path, capsys, change, words, command):
    """A config claiming more layers / experts or other sizes than the weights: one line, no run on
    random weights (issue 11 #7: 8 claimed layers of a 4-layer checkpoint profiled, exit 0)."""
    src = _copy(model_dir, tmp_path)
    _edit_config(src, **change)
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    if command == "profile":
        args = ["profile", src, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "p.safetensors"]
    else:
        args = ["eval", src, "--task", tmp_path / "d.jsonl"]
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "does not match", *words)
    assert not (tmp_path / "p.safetensors").exists()


def test_inspect_refuses_expert_count_the_weights_do_not_hold(model_dir, tmp_path, capsys):
    src = _copy(model_dir, tmp_path)
    _edit_config(src, num_experts=16, num_local_experts=None)
    rc, _, err = run_cli(capsys, "inspect", src)
    assert_user_error(rc, err, "[16, 64]", "does not match")
    (src / "model.safetensors").unlink()  # config only: nothing to compare, inspect still works
    rc, out, _ = run_cli(capsys, "inspect", src)
    assert rc == 0 and "16" in out


@pytest.mark.parametrize("value", [-4, "8", 0, 2.5, True])
@pytest.mark.parametrize("command", ["inspect", "profile"])
def test_bad_expert_counts(model_dir, tmp_path, capsys, value, command):
    src = _copy(model_dir, tmp_path)
    _edit_config(src, num_experts=value, num_local_experts=None)
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    args = (
        ["inspect", src]
        if command == "inspect"
        else ["profile", src, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "p.safetensors"]
    )
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "'num_experts' is", "not a whole number >= 1")


@pytest.mark.parametrize(
    "field, value", [("num_hidden_layers", 10**9), ("num_experts", 2**40), ("num_experts_per_tok", 2**40)]
)
def test_structure_counts_past_any_model_are_refused_at_once(model_dir, tmp_path, capsys, field, value):
    """Fault audit huge-config-layers-1e9-inspect: a config claiming 10**9 layers hung inspect
    (modules built one by one on the meta device); refused before anything is built."""
    src = _copy(model_dir, tmp_path)
    _edit_config(src, **{field: value})
    t0 = time.perf_counter()
    rc, _, err = run_cli(capsys, "inspect", src)
    assert_user_error(rc, err, f"'{field}' is {value}", "more than any model has")
    assert time.perf_counter() - t0 < 10


def test_top_k_above_the_expert_count(model_dir, tmp_path, capsys):
    """Issue 11 #11: num_experts_per_tok above the experts (PreMoe's K_a) was a ValueError traceback."""
    src = _copy(model_dir, tmp_path)
    _edit_config(src, num_experts_per_tok=16)
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    rc, _, err = run_cli(
        capsys, "profile", src, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "p.safetensors"
    )
    assert_user_error(rc, err, "16 experts active per token", "8 experts per layer")


def test_plan_with_a_huge_expert_count_is_refused_at_once(tmp_path):
    """Issue 11 #12: num_experts 2**70 built set(range(...)) (8 GB, then a hang)."""
    import time

    from moeprune.errors import UserError
    from moeprune.plan import Plan

    base = {
        "format": "moeprune-plan/1",
        "model_fingerprint": "x",
        "model_type": "qwen3_moe",
        "method": "easyep",
        "top_k": 2,
        "layers": [0],
        "kept": {"0": [0, 1]},
    }
    for extra, words in [
        ({"num_experts": 2**70}, "more than any MoE layer has"),
        ({"num_experts": 60000, "replaced": {"0": [2, 3]}}, "not the complement"),
    ]:
        f = tmp_path / "p.json"
        f.write_text(json.dumps({**base, **extra}))
        t0 = time.perf_counter()
        with pytest.raises(UserError, match=words):
            Plan.load(f)
        assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("top_k, hint", [(0, "pass --top-k 1 or more"), (3, "pass --top-k 2 or less")])
def test_top_k_hint_names_a_value_that_works(plan_file, tmp_path, capsys, top_k, hint):
    """Issue 12 §5: --top-k 0 said "pass a smaller --top-k"."""
    profile = plan_file.parent / "p.safetensors"
    rc, _, err = run_cli(
        capsys,
        "plan",
        profile,
        "--method",
        "easyep",
        "--keep",
        "4",
        "--top-k",
        top_k,
        "--out",
        tmp_path / "x.json",
    )
    assert_user_error(rc, err, hint)


def _retensor(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "what, edit, commands, words",
    [
        (
            "extra-tensor",
            lambda t: t.update(extra_weight=torch.zeros(3)),
            ["prune"],
            ["1 unexpected keys", "extra_weight"],
        ),
        (
            "int8-expert",
            lambda t: t.update({UP3: t[UP3].to(torch.int8)}),
            ["prune", "profile"],
            [UP3, "I8", "not quantized"],
        ),
    ],
)
def test_weights_that_would_not_load_as_written_are_refused(
    model_dir, plan_file, tmp_path, capsys, what, edit, commands, words
):
    """Issue 11 #5/#7 (fault audit weights-extra-tensor-prune, weights-dtype-int8-expert-*): prune
    copied a tensor that is no model tensor (its output then refused by every strict loader) and
    int8 expert weights of a float model (cast on load without a word), exit 0."""
    src = _copy(model_dir, tmp_path)
    _retensor(src / "model.safetensors", edit)
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    for command in commands:
        out = tmp_path / f"out-{command}"
        args = {
            "prune": ["prune", src, "--plan", plan_file, "--out", out],
            "profile": ["profile", src, "--data", tmp_path / "d.jsonl", "--out", out],
        }[command]
        rc, _, err = run_cli(capsys, *args)
        assert_user_error(rc, err, *words)
        assert not out.exists()


def test_eval_refuses_non_finite_weights(model_dir, tmp_path, capsys):
    """NaN or Inf weights make every eval score NaN: one line naming the tensor, not exit 0."""
    src = _copy(model_dir, tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello world " * 4}) + "\n")
    args = ["eval", src, "--task", tmp_path / "d.jsonl"]
    _retensor(src / "model.safetensors", lambda t: t["model.embed_tokens.weight"].view(-1).__setitem__(0, float("inf")))
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "'model.embed_tokens.weight' holds an infinite value")
    _retensor(src / "model.safetensors", lambda t: t["model.embed_tokens.weight"].view(-1).__setitem__(0, 0.0))
    _retensor(src / "model.safetensors", lambda t: t["model.norm.weight"].view(-1).__setitem__(3, float("nan")))
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "'model.norm.weight' holds NaN")


def test_an_opened_checkpoint_is_parsed_again_only_when_its_files_change(model_dir, tmp_path, monkeypatch):
    """Checkpoint.open keeps what it parsed while the index and shard headers stay the same bytes: a
    header edited in place at once (same size, the same modification-time tick) is read again."""
    from moeprune import checkpoint as C

    src = _copy(model_dir, tmp_path)
    parsed: list[Path] = []
    read_header = C.read_header
    monkeypatch.setattr(C, "read_header", lambda path, *a: (parsed.append(Path(path)), read_header(path, *a))[1])
    first = C.Checkpoint.open(src)
    again = C.Checkpoint.open(src)
    assert len(parsed) == 1 and again.tensors == first.tensors and again.tensors is not first.tensors
    again.tensors.clear()  # each caller gets containers of its own
    assert C.Checkpoint.open(src).tensors == first.tensors and len(parsed) == 1
    assert C.Checkpoint.open(str(src)).shard_files == first.shard_files  # the same path, as a string
    _edit_header(src / "model.safetensors", _set(UP3, "dtype", "F99"))
    with pytest.raises(UserError, match="F99"):
        C.Checkpoint.open(src)
    (src / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        C.Checkpoint.open(src)


def test_a_header_rewritten_while_the_checkpoint_opens_is_parsed_again(model_dir, tmp_path, monkeypatch):
    """What Checkpoint.open keeps is vouched for by the bytes it parsed: a shard header rewritten
    after its parse, before the open returns, is parsed again at the next open (an identity read
    after the parse would vouch for the new bytes with the old parse)."""
    from moeprune import checkpoint as C

    src = _copy(model_dir, tmp_path)
    read_header = C.read_header
    edited: list[Path] = []

    def rewritten_after_parse(path, *args):
        out = read_header(path, *args)
        if not edited:
            edited.append(Path(path))
            _edit_header(src / "model.safetensors", _set(UP3, "dtype", "F99"))
        return out

    monkeypatch.setattr(C, "read_header", rewritten_after_parse)
    first = C.Checkpoint.open(src)  # parsed before the edit
    assert edited == [src / "model.safetensors"] and first.tensors[UP3].dtype != "F99"
    with pytest.raises(UserError, match="F99"):
        C.Checkpoint.open(src)


def test_prune_parses_each_source_header_once(model_dir, plan_file, tmp_path, capsys, monkeypatch):
    """`moeprune prune` opens the source checkpoint for the plan check and again for the rewrite;
    its headers are parsed once."""
    from moeprune import checkpoint as C

    src = _copy(model_dir, tmp_path)
    parsed: list[Path] = []
    read_header = C.read_header
    monkeypatch.setattr(C, "read_header", lambda path, *a: (parsed.append(Path(path)), read_header(path, *a))[1])
    rc, _, err = run_cli(capsys, "prune", src, "--plan", plan_file, "--out", tmp_path / "out")
    assert rc == 0, err
    assert [p for p in parsed if p.parent == src] == [src / "model.safetensors"]
