"""Model identity beyond the config: the router digest tells two checkpoints of the same shape
apart (a profile or plan of one is refused on the other), agrees between a checkpoint's hub and
fused layouts and the model in memory, and older files without it are still accepted. A novice
prune refuses a profile calibrated on other data than the plan's, unless told to accept it."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

from _cli import assert_user_error, run_cli
from moeprune.arch import find_moe_blocks
from moeprune.identity import (
    KEY,
    canonical_bytes,
    checkpoint_router_digest,
    model_router_digest,
    stored_canonical_bytes,
)
from moeprune.plan import Plan
from moeprune.profile import Profile
from moeprune.testing.tiny import byte_tokenizer, tiny_model

TYPE = "qwen3_moe"  # saved one key per expert in the hub layout


@cache
def _model(seed: int):
    model = tiny_model(TYPE, seed=seed)
    model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id = 2, 0, 1
    return model


def _save(model, path: Path, layout: str = "fused") -> Path:
    model.save_pretrained(path, save_original_format=(layout == "hub"))
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("identity")
    return {
        "a": _save(_model(0), base / "a"),
        "a_hub": _save(_model(0), base / "a_hub", "hub"),
        "b": _save(_model(1), base / "b"),  # same config, other random weights
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    for name, words in (("math", "1 + 2 = 3"), ("code", "def f(): return 1")):
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": f"{words} {i}"}) + "\n" for i in range(4))
        )
    return {"math": d / "math.jsonl", "code": d / "code.jsonl"}


def test_digest_agrees_across_layouts_and_memory(dirs):
    a, a_hub, b = (checkpoint_router_digest(dirs[k]) for k in ("a", "a_hub", "b"))
    assert a and a == a_hub and a != b
    from moeprune.checkpoint import Checkpoint

    assert any(".experts.0." in k for k in Checkpoint.open(dirs["a_hub"]).tensors)  # really another layout
    model = _model(0)
    blocks = find_moe_blocks(model)
    assert model_router_digest(model, blocks) == a
    bf16 = tiny_model(TYPE, seed=0).to(torch.bfloat16)
    assert model_router_digest(bf16, find_moe_blocks(bf16)) == a  # the dtype moeprune loads on GPU


STORED = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64"}


def _ties(dtype: torch.dtype) -> torch.Tensor:
    """Values of ``dtype`` that lie exactly halfway between two bfloat16 numbers (the rounding must
    go to the even one: up from an odd last kept bit, down from an even one), and near ties."""
    g = torch.Generator().manual_seed(3)
    top = torch.randint(0x0080, 0x7F00, (4096,), generator=g, dtype=torch.int64)  # normal bf16 bits
    sign = torch.randint(0, 2, (4096,), generator=g, dtype=torch.int64) << 31
    if dtype == torch.float16:  # 10 mantissa bits: the 3 below bfloat16's 7 are 100 (a tie), 011, 101
        low = torch.tensor([0b100, 0b011, 0b101], dtype=torch.int16).repeat(1366)[:4096]
        mant = torch.randint(0, 128, (4096,), generator=g, dtype=torch.int16) << 3
        exp = torch.randint(1, 31, (4096,), generator=g, dtype=torch.int16) << 10
        return (exp | mant | low).view(torch.float16)
    f32 = ((top << 16) | 0x8000 | sign).to(torch.int32).view(torch.float32)  # exact ties
    near = ((top << 16) | 0x7FFF | sign).to(torch.int32).view(torch.float32)
    if dtype == torch.float32:
        return torch.cat([f32, near])
    # float64 -> float32 -> bfloat16: ties at the float32 rounding, and bfloat16 ties
    halfway = f32.double() + f32.double().abs() * 2.0**-25  # exactly half a float32 step above a tie
    return torch.cat([f32.double(), halfway, near.double()])


@pytest.mark.parametrize("dtype", list(STORED))
def test_stored_bytes_digest_equals_torch(dtype):
    """The digest's canonical bytes computed from a tensor's stored bytes without torch equal
    torch's, bit for bit: random values, zeros of both signs, the largest and smallest normal
    numbers, and values on the rounding ties of each conversion."""
    g = torch.Generator().manual_seed(0)
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, -info.tiny], dtype=dtype)
    x = torch.cat([(torch.randn(6000, generator=g, dtype=torch.float64) * 4).to(dtype), special])
    if dtype != torch.bfloat16:
        x = torch.cat([x, _ties(dtype)])
    stored = x.contiguous().view(torch.uint8).numpy().tobytes()
    got = stored_canonical_bytes(STORED[dtype], stored)
    if dtype in (torch.float32, torch.float64):  # info.max rounds up to inf in bfloat16 (and float64's
        assert got is None  # tiny is no float32 number): left to torch; the rest computed here
        x = x[(x.abs() < 1e38) & ((x == 0) | (x.abs() >= torch.finfo(torch.float32).tiny))]
        got = stored_canonical_bytes(STORED[dtype], x.contiguous().view(torch.uint8).numpy().tobytes())
    assert got is not None and got == canonical_bytes(x)
    if dtype == torch.float16:  # an F16 subnormal is a normal float32: computed, and exact
        sub = torch.tensor([info.tiny / 4, -info.tiny / 1024], dtype=dtype)
        assert stored_canonical_bytes("F16", sub.view(torch.uint8).numpy().tobytes()) == canonical_bytes(sub)


@pytest.mark.parametrize("dtype", list(STORED))
def test_stored_bytes_leave_inf_nan_and_subnormals_to_torch(dtype):
    bads = [float("inf"), float("-inf"), float("nan")]
    if dtype != torch.float16:  # a float32 subnormal (or a float64 below float32's normal numbers)
        bads.append(torch.finfo(torch.float32).tiny / 4)
    if dtype == torch.float64:
        bads += [1e-300, 1e39]  # flushed to zero, and past float32's largest: inf
    for bad in bads:
        x = torch.tensor([1.0, bad, 0.5], dtype=torch.float64).to(dtype)
        assert stored_canonical_bytes(STORED[dtype], x.view(torch.uint8).numpy().tobytes()) is None, bad
    assert stored_canonical_bytes("F8_E4M3", b"\x00") is None


@pytest.mark.parametrize("special", [None, float("inf"), float("nan")])
def test_checkpoint_digest_from_stored_bf16_equals_torch(special, tmp_path, monkeypatch):
    """A bfloat16 checkpoint's digest read from its stored bytes equals the digest through torch;
    with an infinity or a NaN in a router, the digest is read through torch (and still equals it)."""
    from moeprune.checkpoint import Checkpoint

    model = tiny_model(TYPE, seed=2).to(torch.bfloat16)
    blocks = find_moe_blocks(model)
    if special is not None:
        with torch.no_grad():
            model.get_parameter(blocks[-1].router_weight_path)[1, 2] = special
    model.save_pretrained(tmp_path)
    read = []
    real = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, key: read.append(key) or real(self, key))
    assert checkpoint_router_digest(tmp_path) == model_router_digest(model, blocks)
    assert read == ([] if special is None else [read[0]])  # torch reads only the router with it
    assert ("mlp.gate" in read[0]) if read else True


def _profile(capsys, model: Path, data: Path, out: Path) -> Path:
    rc, _, err = run_cli(capsys, "profile", model, "--data", data, "--out", out, "--quiet")
    assert rc == 0, err
    return out


def _plan(capsys, profile: Path, out: Path) -> Path:
    rc, _, err = run_cli(capsys, "plan", profile, "--method", "frequency", "--keep", "0.5", "--out", out)
    assert rc == 0, err
    return out


def test_plan_of_another_checkpoint_is_refused(dirs, data, tmp_path, capsys):
    prof = _profile(capsys, dirs["a"], data["math"], tmp_path / "a.profile.safetensors")
    assert Profile.load(prof).meta[KEY] == checkpoint_router_digest(dirs["a"])
    plan = _plan(capsys, prof, tmp_path / "plan.json")
    assert Plan.load(plan).router_sha256 == checkpoint_router_digest(dirs["a"])

    rc, _, err = run_cli(capsys, "prune", dirs["b"], "--plan", plan, "--out", tmp_path / "b-out")
    assert_user_error(rc, err, "plan", "other router weights")
    assert not (tmp_path / "b-out").exists()
    rc, _, err = run_cli(capsys, "prune", dirs["a_hub"], "--plan", plan, "--out", tmp_path / "hub-out")
    assert rc == 0, err  # the same weights in the hub layout

    # the profile of b, given to prune a with a's plan, is refused too
    prof_b = _profile(capsys, dirs["b"], data["math"], tmp_path / "b.profile.safetensors")
    args = [
        "prune",
        dirs["a"],
        "--plan",
        plan,
        "--mode",
        "novice",
        "--profile",
        prof_b,
        "--out",
        tmp_path / "n",
    ]
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "profile", "other router weights")
    # and combining profiles of a and b in one plan
    args = [
        "plan",
        prof,
        "--profile",
        prof_b,
        "-m",
        "frequency",
        "--keep",
        "0.5",
        "--out",
        tmp_path / "ab.json",
    ]
    rc, _, err = run_cli(capsys, *args)
    assert_user_error(rc, err, "other router weights")


def test_old_plan_without_digest_is_accepted(dirs, data, tmp_path, capsys):
    prof = _profile(capsys, dirs["a"], data["math"], tmp_path / "a.profile.safetensors")
    plan = _plan(capsys, prof, tmp_path / "plan.json")
    old = json.loads(plan.read_text())
    del old[KEY]
    plan.write_text(json.dumps(old))
    rc, _, err = run_cli(capsys, "prune", dirs["b"], "--plan", plan, "--out", tmp_path / "out")
    assert rc == 0, err  # config fingerprint only, as before


def test_novice_profile_of_other_data_is_refused(dirs, data, tmp_path, capsys):
    math = _profile(capsys, dirs["a"], data["math"], tmp_path / "math.profile.safetensors")
    code = _profile(capsys, dirs["a"], data["code"], tmp_path / "code.profile.safetensors")
    plan = _plan(capsys, math, tmp_path / "plan.json")
    base = ["prune", dirs["a"], "--plan", plan, "--mode", "novice"]
    rc, _, err = run_cli(capsys, *base, "--profile", code, "--out", tmp_path / "code-out")
    assert_user_error(rc, err, "other data", "--allow-other-profile")
    assert not (tmp_path / "code-out").exists()
    rc, _, err = run_cli(
        capsys, *base, "--profile", code, "--out", tmp_path / "forced", "--allow-other-profile"
    )
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *base, "--profile", math, "--out", tmp_path / "ok")
    assert rc == 0, err
