"""The rest of the surgery: ragged checkpoints (different expert counts per layer) loaded by
``moeprune.load``, ``--pad-uniform`` (dead padding experts, stock loading), and MoNE novice
checkpoints. Every checkpoint is compared with the original model steered by ``patch_moe``
(masked routing, or constant novice outputs): float32 logits, rtol/atol 1e-5."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import pytest
import torch

import moeprune
from _checkpoints import (
    TOL,
    load_stock,
    masked_logits,
    novice_logits,
    ragged_plan,
    random_novices,
    run_logits,
)
from _cli import assert_user_error, run_cli, run_cli_fresh
from moeprune.arch import ARCH_TABLE, BlockEvent, find_moe_blocks
from moeprune.arch.pruned import pad_uniform_problem
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.plan import Plan
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import _LAYER_LISTS, buildable_types, tiny_config, tiny_model

TYPES = [t for t in buildable_types() if t in ARCH_TABLE]  # unsupported types: tests/test_arch.py
HUB_PER_EXPERT = ("deepseek_v3", "qwen3_moe", "mixtral")  # saved one key per expert
NOVICE_TYPES = ("deepseek_v3", "qwen3_moe", "gpt_oss", "mixtral")


# --- tiny models with several MoE layers ------------------------------------------------------------


_SLOW = ("linear", "conv", "mamba")  # reference kernels of linear-attention / SSM layers are slow on CPU


def _deeper_overrides(model_type: str) -> dict:
    """Two more decoder layers, so every type has at least two MoE layers (the default tiny models
    of many types have one): per-layer lists get their last two entries again. Linear-attention /
    SSM layer kinds become the list's other kind: their CPU reference kernels take seconds per
    forward, and the MoE blocks do not depend on the attention kind (tests/test_surgery.py runs
    the hybrid layouts)."""
    cfg = tiny_config(model_type)
    text = cfg.get_text_config()
    n = text.num_hidden_layers
    over: dict = {"num_hidden_layers": n + 2}
    for name in _LAYER_LISTS:
        value = getattr(text, name, None)
        settable = not isinstance(getattr(type(text), name, None), property)
        if isinstance(value, list) and len(value) == n and n >= 2 and settable:
            fast = [v for v in value if not any(w in str(v) for w in _SLOW)]
            if fast:
                value = [v if v in fast else fast[-1] for v in value]
            over[name] = list(value) + list(value[-2:])
    return {"text_config": over} if text is not cfg else over


@cache
def _model(model_type: str):
    model = tiny_model(model_type, **_deeper_overrides(model_type))
    try:
        blocks = find_moe_blocks(model)
    except UserError:
        return model, None
    return model, blocks


def _tiny(model_type: str):
    model, blocks = _model(model_type)
    if blocks is None:
        raise AssertionError(f"{model_type} is in ARCH_TABLE but find_moe_blocks refuses it")
    assert len(blocks) >= 2, model_type
    return model, blocks


@cache
def _bias_types() -> list[str]:
    """Supported types whose router has an additive selection bias (pad-uniform applies), and no
    layers kept whole (DeepSeek-V4's hash layers: refused, tests/test_arch_variants.py)."""
    from moeprune.arch.variants import whole_layers
    from moeprune.modelio import build_on_meta

    out = []
    for t in TYPES:
        try:
            meta = build_on_meta(tiny_config(t))
            blocks = find_moe_blocks(meta)
        except UserError:
            continue
        if pad_uniform_problem(blocks[0]) is None and not whole_layers(meta):
            out.append(t)
    return out


@cache
def _ragged_reference(model_type: str, seed: int) -> torch.Tensor:
    model, blocks = _tiny(model_type)
    return masked_logits(model, blocks, ragged_plan(blocks, seed))


def _remote_load(path: Path):
    """The checkpoint as plain transformers loads it with ``trust_remote_code``: its own
    ``modeling_moeprune.py`` (imported from the folder here; tests/test_remote_code.py runs the
    whole ``AutoModelForCausalLM`` path without moeprune importable)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"remote_{path.parent.name}_{path.name}", path / "modeling_moeprune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MoepruneForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _check_remote(result, path: Path, reference: torch.Tensor) -> None:
    """A ragged / novice checkpoint either carries an exact plain-transformers loader, or says
    why not; either way stock transformers refuses it (its model type is moeprune's)."""
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "moeprune_" + config["moeprune"]["base_model_type"]
    if result.remote_code_problem is not None:
        assert "auto_map" not in config and not (path / "modeling_moeprune.py").exists()
        return
    torch.testing.assert_close(run_logits(_remote_load(path)), reference, **TOL)


def _save(model, path: Path, layout: str = "fused") -> Path:
    model.save_pretrained(path, save_original_format=(layout == "hub"))
    return path


# --- ragged remove -------------------------------------------------------------------------------


def _check_ragged(model_type: str, layout: str, tmp_path: Path) -> None:
    model, blocks = _tiny(model_type)
    src = _save(model, tmp_path / "src", layout)
    kept = ragged_plan(blocks)
    counts = {layer: len(ids) for layer, ids in kept.items()}
    assert len(set(counts.values())) > 1
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    assert result.ragged and not result.stock and result.kept_counts == counts
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    from moeprune.arch.variants import whole_layers

    recorded = {**whole_layers(model), **counts}  # hash-routed layers (DeepSeek-V4) are kept whole
    assert config["moeprune"]["experts_per_layer"] == {str(k): v for k, v in recorded.items()}
    pruned = moeprune.load(tmp_path / "out", dtype=torch.float32)
    assert {b.layer: b.num_experts for b in find_moe_blocks(pruned)} == counts
    torch.testing.assert_close(run_logits(pruned), _ragged_reference(model_type, 0), **TOL)
    _check_remote(result, tmp_path / "out", _ragged_reference(model_type, 0))


@pytest.mark.parametrize("model_type", TYPES)
def test_ragged_loads_exactly(model_type, tmp_path):
    _check_ragged(model_type, "fused", tmp_path)


@pytest.mark.parametrize("model_type", HUB_PER_EXPERT)
def test_ragged_loads_exactly_from_hub_layout(model_type, tmp_path):
    _check_ragged(model_type, "hub", tmp_path)


def test_ragged_checkpoint_is_refused_by_stock_loading_and_by_surgery(tmp_path):
    model, blocks = _tiny("qwen3_moe")
    src = _save(model, tmp_path / "src")
    rewrite_checkpoint(src, tmp_path / "out", ragged_plan(blocks))
    from transformers import AutoModelForCausalLM

    with pytest.raises((RuntimeError, ValueError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(UserError, match="ragged checkpoint"):
        rewrite_checkpoint(tmp_path / "out", tmp_path / "again", ragged_plan(blocks))
    assert not (tmp_path / "again").exists()


def test_uniform_checkpoint_loads_both_ways(tmp_path):
    model, blocks = _tiny("glm4_moe")
    src = _save(model, tmp_path / "src")
    kept = {b.layer: [0, 1, 2, 4, 5, 6] for b in blocks}
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    assert result.stock and not result.ragged
    ref = masked_logits(model, blocks, kept)
    torch.testing.assert_close(run_logits(load_stock(tmp_path / "out")), ref, **TOL)
    torch.testing.assert_close(run_logits(moeprune.load(tmp_path / "out", dtype=torch.float32)), ref, **TOL)


# --- pad-uniform ---------------------------------------------------------------------------------


def _check_padded(model_type: str, layout: str, tmp_path: Path) -> None:
    model, blocks = _tiny(model_type)
    src = _save(model, tmp_path / "src", layout)
    kept = ragged_plan(blocks)
    top = max(len(v) for v in kept.values())
    result = rewrite_checkpoint(src, tmp_path / "out", kept, pad_uniform=True)
    assert result.padded and result.stock
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    dead = {int(k): v for k, v in config["moeprune"]["dead_experts"].items()}
    assert sum(map(len, dead.values())) == sum(top - len(v) for v in kept.values())
    padded = load_stock(tmp_path / "out")
    pblocks = find_moe_blocks(padded)
    assert {b.num_experts for b in pblocks} == {top}
    chosen: dict[int, set[int]] = {b.layer: set() for b in pblocks}

    def see(event: BlockEvent) -> None:
        chosen[event.block.layer] |= set(event.top_k_index.flatten().tolist())

    logits = run_logits(padded, blocks=pblocks, observer=see)
    torch.testing.assert_close(logits, _ragged_reference(model_type, 0), **TOL)
    for layer, slots in dead.items():
        assert not chosen[layer] & set(slots), (layer, chosen[layer], slots)


@pytest.mark.parametrize("model_type", _bias_types())
def test_pad_uniform_loads_with_stock_transformers(model_type, tmp_path):
    _check_padded(model_type, "fused", tmp_path)


def test_pad_uniform_hub_layout_and_negative_biases(tmp_path):
    """Per-expert keys get zero padding experts; kept experts with strongly negative selection biases
    (selection scores near -3) still always beat the dead ones, and groups keep their size."""
    model = copy.deepcopy(_tiny("deepseek_v3")[0])
    for b in find_moe_blocks(model):
        b.selection_bias(model).data.sub_(3.0)
    blocks = find_moe_blocks(model)
    src = _save(model, tmp_path / "src", "hub")
    kept = ragged_plan(blocks, seed=5)
    rewrite_checkpoint(src, tmp_path / "out", kept, pad_uniform=True)
    keys = set(Checkpoint.open(tmp_path / "out").tensors)
    layer = min(kept, key=lambda k: len(kept[k]))
    assert f"model.layers.{layer}.mlp.experts.7.gate_proj.weight" in keys
    padded = load_stock(tmp_path / "out")
    torch.testing.assert_close(run_logits(padded), masked_logits(model, blocks, kept), **TOL)


def test_pad_uniform_places_dead_experts_in_every_group(tmp_path):
    from moeprune.arch.pruned import padding_slots

    _, blocks = _tiny("deepseek_v3")
    slots = padding_slots(blocks[0], [1, 3, 4, 6], 6)  # groups {0..3}, {4..7}; 2 kept of each
    assert slots == [1, 3, None, 4, 6, None]


# --- novice (MoNE) -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", NOVICE_TYPES)
def test_novice_checkpoint_loads_exactly(model_type, tmp_path):
    model, blocks = _tiny(model_type)
    layout = "hub" if model_type in HUB_PER_EXPERT else "fused"
    src = _save(model, tmp_path / "src", layout)
    kept = ragged_plan(blocks, seed=11)
    novices = random_novices(blocks, kept, model.config.get_text_config().hidden_size)
    result = rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices)
    assert result.mode == "novice" and not result.stock
    assert result.bytes_out < result.bytes_in
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    ref = novice_logits(model, blocks, kept, novices)
    torch.testing.assert_close(run_logits(loaded), ref, **TOL)
    _check_remote(result, tmp_path / "out", ref)
    # the loaded model is itself a MoE moeprune can observe: routers over all E, same outputs
    lblocks = find_moe_blocks(loaded)
    assert [b.num_experts for b in lblocks] == [b.num_experts for b in blocks]
    seen = []
    torch.testing.assert_close(run_logits(loaded, blocks=lblocks, observer=seen.append), ref, **TOL)
    assert len(seen) == len(blocks)


def test_novice_refuses_non_finite_vectors(tmp_path):
    """A NaN novice vector would make every token routed to that expert NaN: refuse, name it."""
    model, blocks = _tiny("qwen3_moe")
    src = _save(model, tmp_path / "src", "fused")
    kept = ragged_plan(blocks, seed=11)
    novices = random_novices(blocks, kept, model.config.get_text_config().hidden_size)
    last = blocks[-1]
    replaced = sorted(set(range(last.num_experts)) - set(kept[last.layer]))
    novices[last.layer][1, 0] = float("nan")
    with pytest.raises(UserError, match=f"expert {replaced[1]} of layer {last.layer} is NaN"):
        rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices)
    assert not (tmp_path / "out").exists()


def test_novice_gpt_oss_as_stock_checkpoint(tmp_path):
    model, blocks = _tiny("gpt_oss")
    src = _save(model, tmp_path / "src")
    kept = ragged_plan(blocks, seed=13)
    novices = random_novices(blocks, kept, model.config.hidden_size)
    result = rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices, pad_uniform=True)
    assert result.stock and result.padded
    loaded = load_stock(tmp_path / "out")
    torch.testing.assert_close(run_logits(loaded), novice_logits(model, blocks, kept, novices), **TOL)
    # the module's own activation of 0 is 0: a zeroed expert outputs exactly its down bias
    experts = blocks[0].experts(loaded)
    gated = experts._apply_gate(torch.zeros(3, experts.gate_up_proj.shape[-1]))
    assert gated.shape[-1] > 0 and not gated.any()


def test_novice_pad_uniform_refused_without_expert_biases(tmp_path):
    model, blocks = _tiny("qwen3_moe")
    src = _save(model, tmp_path / "src")
    kept = ragged_plan(blocks)
    novices = random_novices(blocks, kept, model.config.hidden_size)
    with pytest.raises(UserError, match="no biases"):
        rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices, pad_uniform=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- the command line ----------------------------------------------------------------------------


def _fingerprint(model_dir: Path) -> tuple[str, object]:
    from moeprune.modelio import load_config
    from moeprune.profile import fingerprint_fields, model_fingerprint

    config = load_config(str(model_dir))
    return model_fingerprint(fingerprint_fields(config)), config


def _plan_file(path: Path, model_dir: Path, kept: dict[int, list[int]]) -> Path:
    fp, config = _fingerprint(model_dir)
    blocks = find_moe_blocks(_model(config.model_type)[0])
    plan = Plan(
        model_fingerprint=fp,
        model_type=config.model_type,
        layers=sorted(kept),
        num_experts=blocks[0].num_experts,
        top_k=blocks[0].top_k,
        method="frequency",
        kept=kept,
        settings={"scope": "global"},
    )
    path.write_text(plan.dumps())
    return path


def _profile_file(path: Path, model_dir: Path) -> tuple[Path, torch.Tensor]:
    from moeprune.modelio import load_config
    from moeprune.profile import Profile

    config = load_config(str(model_dir))
    blocks = find_moe_blocks(_model(config.model_type)[0])
    n_layers, e, h, t = len(blocks), blocks[0].num_experts, config.get_text_config().hidden_size, 4
    tensors = {"tokens": torch.tensor([float(t)], dtype=torch.float64)}
    for name in ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1"):
        tensors[name] = torch.ones(n_layers, e, dtype=torch.float64)
    tensors["premoe_q"] = torch.zeros(n_layers, t, 2)
    tensors["premoe_f"] = torch.zeros(n_layers, t, 2)
    tensors["premoe_idx"] = torch.zeros(n_layers, t, 2, dtype=torch.int32)
    mean = torch.randn(n_layers, e, h, generator=torch.Generator().manual_seed(3))
    tensors["mone_mean"] = mean
    tensors["mone_m2"] = torch.ones(n_layers, e, h)
    prof = Profile.build(
        tensors, model=str(model_dir), config=config, blocks=blocks, samples=2, data=[], settings={}
    )
    prof.save(path)
    return path, mean


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    return _save(_tiny("mixtral")[0], tmp_path_factory.mktemp("mixtral") / "model", "hub")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return _save(_tiny("qwen3_moe")[0], tmp_path_factory.mktemp("qwen") / "model")


def test_cli_ragged_and_novice(mixtral_dir, tmp_path, capsys):
    model, blocks = _tiny("mixtral")
    kept = ragged_plan(blocks)
    plan = _plan_file(tmp_path / "plan.json", mixtral_dir, kept)
    rc, _, err = run_cli(capsys, "prune", mixtral_dir, "--plan", plan, "--out", tmp_path / "ragged")
    assert rc == 0, err
    card = (tmp_path / "ragged" / "README.md").read_text()
    assert "| mode | remove (ragged) |" in card and "moeprune.load" in card
    for layer, ids in kept.items():
        assert f"| {layer} | {len(ids)} |" in card
    from moeprune.modelio import load_model

    lm, _ = load_model(str(tmp_path / "ragged"))  # what moeprune's commands use: moeprune.load here
    torch.testing.assert_close(run_logits(lm), masked_logits(model, blocks, kept), **TOL)

    profile, mean = _profile_file(tmp_path / "p.profile.safetensors", mixtral_dir)
    out = tmp_path / "novice"
    args = ["prune", mixtral_dir, "--plan", plan, "--mode", "novice", "--profile", profile, "--out", out]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    card = (out / "README.md").read_text()
    assert "| mode | novice |" in card and "novice expert ids" in card
    assert json.loads((out / "config.json").read_text())["moeprune"]["mode"] == "novice"
    rows = {b.layer: i for i, b in enumerate(blocks)}
    novices = {b.layer: mean[rows[b.layer], sorted(set(range(8)) - set(kept[b.layer]))] for b in blocks}
    torch.testing.assert_close(
        run_logits(moeprune.load(out, dtype=torch.float32)),
        novice_logits(model, blocks, kept, novices),
        **TOL,
    )


def test_cli_ragged_and_novice_of_a_header_family_import_no_transformers_or_torch(mixtral_dir, tmp_path):
    """A ragged removal and a novice checkpoint of a family arch/header_keys.py knows are written
    without transformers (no config class, no model code, no meta build: the remote-code loader's
    spec comes from config.json and the headers) and without torch (the novice vectors are read
    from the profile file as numpy arrays, moeprune/profile_file.py)."""
    _, blocks = _tiny("mixtral")
    plan = _plan_file(tmp_path / "plan.json", mixtral_dir, ragged_plan(blocks))
    profile, _ = _profile_file(tmp_path / "p.profile.safetensors", mixtral_dir)
    for mode, extra in (("remove", []), ("novice", ["--profile", profile])):
        args = ["prune", mixtral_dir, "--plan", plan, "--mode", mode, *extra, "--out", tmp_path / mode]
        rc, modules = run_cli_fresh(*args)
        assert (rc, [m for m in modules if m != "numpy"]) == (0, []), mode
        assert (tmp_path / mode / "modeling_moeprune.py").is_file()


def test_novice_rows_read_without_torch_are_the_profiles(mixtral_dir, tmp_path):
    """profile_file.novice_rows gives the rows Profile.novices gives, as float32 numpy arrays, for
    both fits; it gives None (the caller then reads the profile with torch, which names the
    problem) for another model's fingerprint, a tensor that no longer matches its checksum, a layer
    the profile lacks, a fit it does not store, or a file that is no profile."""
    import numpy as np

    from moeprune.checkpoint import read_header
    from moeprune.profile import Profile
    from moeprune.profile_file import novice_rows

    _, blocks = _tiny("mixtral")
    kept = ragged_plan(blocks)
    replaced = {b.layer: sorted(set(range(b.num_experts)) - set(kept[b.layer])) for b in blocks}
    path, _ = _profile_file(tmp_path / "p.profile.safetensors", mixtral_dir)
    prof = Profile.load(path)
    fp = prof.meta["model_fingerprint"]
    rows = novice_rows(path, "mean", fp, replaced)
    assert rows is not None and sorted(rows) == sorted(replaced)
    for layer, ids in replaced.items():
        want = prof.novices("mean")[prof.layers.index(layer), ids].numpy()
        assert rows[layer].dtype == np.float32 and np.array_equal(rows[layer], want)
    assert novice_rows(path, "lsq", fp, replaced) is None  # this profile stores no lsq fit
    assert novice_rows(path, "median", fp, replaced) is None
    assert novice_rows(path, "mean", "0" * 64, replaced) is None
    assert novice_rows(path, "mean", fp, {**replaced, 99: [0]}) is None
    assert novice_rows(mixtral_dir / "model.safetensors", "mean", fp, replaced) is None
    info = read_header(path)[0]["mone_mean"]
    data = bytearray(path.read_bytes())
    data[info.start + 5] ^= 0x40  # one bit of a novice vector
    bad = tmp_path / "bad.profile.safetensors"
    bad.write_bytes(bytes(data))
    assert novice_rows(bad, "mean", fp, replaced) is None


def test_cli_novice_refuses_a_corrupt_profile_as_before(mixtral_dir, tmp_path, capsys):
    """A profile whose novice tensor no longer matches its checksum is refused with the torch
    path's line (the torch-free read steps aside), and nothing is written."""
    from moeprune.checkpoint import read_header

    _, blocks = _tiny("mixtral")
    plan = _plan_file(tmp_path / "plan.json", mixtral_dir, ragged_plan(blocks))
    path, _ = _profile_file(tmp_path / "p.profile.safetensors", mixtral_dir)
    info = read_header(path)[0]["mone_mean"]
    data = bytearray(path.read_bytes())
    data[info.start + 5] ^= 0x40
    path.write_bytes(bytes(data))
    out = tmp_path / "novice"
    rc, _, err = run_cli(capsys, "prune", mixtral_dir, "--plan", plan, "--mode", "novice", "--profile", path, "--out", out)
    assert_user_error(rc, err, "corrupted", "mone_mean")
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
def test_entry_bytes_round_as_torch_casts(dtype):
    """The bytes a novice vector or a generated bias is written as (numpy, so that the header path
    needs no torch) are the bytes torch's cast gives: round to nearest even (bf16 ties included),
    subnormals, signed zeros, the largest values and overflow to infinity."""
    import numpy as np

    from moeprune.surgery import _entry_bytes

    g = torch.Generator().manual_seed(0)
    f32 = torch.cat(
        [
            torch.randn(4096, generator=g) * 10.0 ** torch.randint(-8, 8, (4096,), generator=g),
            torch.tensor([0.0, -0.0, 1e-40, -1e-45, 3.0e38, -3.4e38, 65504.0, 65520.0, 1e5, 6e-8]),
            # bf16 ties: the low 16 bits exactly 0x8000, with even and odd kept bits
            torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000], dtype=torch.int64)
            .to(torch.int32)
            .view(torch.float32),
        ]
    )
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}[dtype]
    want = f32.to(torch_dtype).view(torch.uint8).numpy().tobytes()
    assert _entry_bytes(f32, dtype, "x") == want
    assert _entry_bytes(f32.numpy(), dtype, "x") == want
    assert _entry_bytes(f32.numpy().astype(np.float64), dtype, "x") == want


def test_cli_refuses_bad_mode_input(mixtral_dir, qwen_dir, tmp_path, capsys):
    kept = ragged_plan(_tiny("mixtral")[1])
    plan = _plan_file(tmp_path / "plan.json", mixtral_dir, kept)
    other, _ = _profile_file(tmp_path / "qwen.profile.safetensors", qwen_dir)
    out = tmp_path / "out"
    base = ["prune", mixtral_dir, "--plan", plan, "--out", out]
    cases = [
        (["--pad-uniform"], ["--pad-uniform", "selection bias"]),
        (["--mode", "novice"], ["--mode novice", "--profile"]),
        (["--mode", "novice", "--profile", other], ["profile", "was made on model"]),
        (["--mode", "novice", "--profile", tmp_path / "none.safetensors"], ["does not exist"]),
        (["--mode", "mask"], ["unknown --mode"]),
        (["--mode", "novice", "--profile", other, "--pad-uniform"], ["was made on model"]),
    ]
    for extra, words in cases:
        rc, _, err = run_cli(capsys, *base, *extra)
        assert_user_error(rc, err, *words)
        assert not out.exists(), extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "qwen.profile.safetensors"]
