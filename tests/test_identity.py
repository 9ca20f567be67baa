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
from moeprune.identity import KEY, checkpoint_router_digest, model_router_digest
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
