"""Remove surgery: the rewritten checkpoint loads with stock transformers and reproduces the original
model with the removed experts masked out of routing (float32, tiny random models)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from _checkpoints import plan_for
from _cli import assert_user_error, run_cli
from moeprune.arch import ARCH_TABLE, find_moe_blocks, kept_controls, patch_moe
from moeprune.checkpoint import Checkpoint, TensorInfo, read_header
from moeprune.errors import UserError
from moeprune.outputs import write_marker
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import buildable_types, tiny_model

TYPES = [t for t in buildable_types() if t in ARCH_TABLE]  # unsupported types: tests/test_arch.py
HUB_PER_EXPERT = ("deepseek_v3", "qwen3_moe", "mixtral")  # must really be saved one key per expert
# hash-routed layers kept whole beside pruned ones: the checkpoint is ragged, read by moeprune.load
WHOLE_LAYER_TYPES = ("deepseek_v4",)


@cache
def _model(model_type: str):
    model = tiny_model(model_type)
    try:
        blocks = find_moe_blocks(model)
    except UserError:
        return model, None  # refused by design (unsupported type)
    return model, blocks


def _tiny(model_type: str):
    model, blocks = _model(model_type)
    if blocks is None:
        raise AssertionError(f"{model_type} is in ARCH_TABLE but find_moe_blocks refuses it")
    return model, blocks


def _save(model, path: Path, layout: str, **kwargs) -> Path:
    model.save_pretrained(path, save_original_format=(layout == "hub"), **kwargs)
    return path


def _kept(blocks, drop_per_group: int = 1) -> dict[int, list[int]]:
    """6 of 8 experts, different ones per layer, the same number from every routing group."""
    kept = {}
    for b in blocks:
        e, g = b.num_experts, b.spec.n_group
        if g > 1:
            size = e // g
            drop = {
                grp * size + (b.layer + grp + j) % size for grp in range(g) for j in range(drop_per_group)
            }
        else:
            drop = {b.layer % e, (3 * b.layer + 5) % e}
        kept[b.layer] = sorted(set(range(e)) - drop)
    return kept


def _ids(model) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _reference(model, blocks, kept, top_k=None) -> torch.Tensor:
    with torch.no_grad(), patch_moe(model, blocks, controls=kept_controls(blocks, kept, top_k)):
        return model(_ids(model), use_cache=False).logits


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(model), use_cache=False).logits


@pytest.mark.parametrize("layout", ["fused", "hub"])
@pytest.mark.parametrize("model_type", TYPES)
def test_remove_matches_masked_reference(model_type, layout, tmp_path):
    model, blocks = _tiny(model_type)
    src = _save(model, tmp_path / "src", layout)
    if layout == "hub" and model_type in HUB_PER_EXPERT:
        assert any(".experts.0." in k for k in Checkpoint.open(src).tensors)
    kept = _kept(blocks)
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    assert result.kept_per_layer == 6 and result.bytes_out < result.bytes_in
    assert result.stock == (model_type not in WHOLE_LAYER_TYPES)
    if result.stock:
        pruned = _load(tmp_path / "out")
    else:
        import moeprune

        pruned = moeprune.load(tmp_path / "out", dtype=torch.float32)
    pruned_blocks = find_moe_blocks(pruned)
    assert [b.num_experts for b in pruned_blocks] == [6] * len(blocks)
    torch.testing.assert_close(_logits(pruned), _reference(model, blocks, kept), rtol=1e-5, atol=1e-5)


def test_hub_layout_renumbers_and_leaves_the_rest_alone(tmp_path):
    model, blocks = _tiny("deepseek_v3")
    src = _save(model, tmp_path / "src", "hub")
    for name in ("tokenizer.json", "chat_template.jinja"):
        (src / name).write_text("{}")
    (src / "README.md").write_text("original card")
    kept = _kept(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept, plan={"method": "easyep"}, metadata={"tokens": 7})
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "plan.json"):
        assert name in names
    assert {"README.md", "README.original.md", "profile-meta.json", "model.safetensors"} <= set(names)
    assert "6/8" in (out / "README.md").read_text()
    layer = blocks[0].layer
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(out / "model.safetensors", "pt") as b:
        src_keys, out_keys = set(a.keys()), set(b.keys())
        untouched = [k for k in src_keys if ".experts." not in k and ".mlp.gate." not in k]
        assert any(".shared_experts." in k for k in untouched)
        assert any(k.startswith("model.layers.0.mlp.gate_proj") for k in untouched)  # dense layer 0
        for k in untouched:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        prefix = f"model.layers.{layer}.mlp"
        for new, old in enumerate(kept[layer]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(
                    b.get_tensor(f"{prefix}.experts.{new}.{proj}.weight"),
                    a.get_tensor(f"{prefix}.experts.{old}.{proj}.weight"),
                )
        assert f"{prefix}.experts.6.gate_proj.weight" not in out_keys
        for name in ("gate.weight", "gate.e_score_correction_bias"):
            assert torch.equal(
                b.get_tensor(f"{prefix}.{name}"), a.get_tensor(f"{prefix}.{name}")[kept[layer]]
            )
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 6 and config["num_experts_per_tok"] == 2


def test_sharded_input_and_output(tmp_path):
    model, blocks = _tiny("qwen3_moe")
    src = _save(model, tmp_path / "src", "fused", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    kept = _kept(blocks)
    result = rewrite_checkpoint(src, tmp_path / "out", kept, max_shard_size="40KB")
    assert len(result.shards) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == result.shards
    assert index["metadata"]["total_size"] == result.bytes_out
    torch.testing.assert_close(
        _logits(_load(tmp_path / "out")), _reference(model, blocks, kept), rtol=1e-5, atol=1e-5
    )


def test_config_aliases_and_lowered_top_k(tmp_path):
    model, blocks = _tiny("qwen3_moe")
    src = _save(model, tmp_path / "src", "hub")
    kept = _kept(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept, top_k=1)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 6  # hub name and transformers-5 name
    assert config["num_experts_per_tok"] == 1
    torch.testing.assert_close(
        _logits(_load(tmp_path / "out")), _reference(model, blocks, kept, top_k=1), rtol=1e-5, atol=1e-5
    )


def test_keys_of_quantised_hub_and_fused_layouts():
    """Per-expert companions (fp8 ``weight_scale_inv``) and fused companions ([E, ...] scales) are
    expert tensors; shared experts and the dense layer are not; a missing expert is an error."""
    from moeprune.arch.keys import map_expert_keys
    from moeprune.modelio import build_on_meta

    model, _ = _tiny("deepseek_v3")
    meta = build_on_meta(model.config)
    blocks = find_moe_blocks(meta)
    layer = blocks[0].layer
    p = f"model.layers.{layer}.mlp"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".experts." not in k}
    for i in range(8):
        for proj, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
            shapes[f"{p}.experts.{i}.{proj}.weight"] = shape
            shapes[f"{p}.experts.{i}.{proj}.weight_scale_inv"] = (1, 1)
    shapes[f"{p}.shared_experts.gate_proj.weight_scale_inv"] = (1, 1)
    found = map_expert_keys(meta, blocks, shapes)
    scale = found.get(f"{p}.experts.5.up_proj.weight_scale_inv")
    assert scale is not None and scale.kind == "per_expert" and scale.expert == 5
    assert scale.renumbered(2) == f"{p}.experts.2.up_proj.weight_scale_inv"
    assert found.get(f"{p}.shared_experts.gate_proj.weight_scale_inv") is None
    assert found.get("model.layers.0.mlp.gate_proj.weight") is None
    assert found.get(f"{p}.gate.weight").axis == 0
    del shapes[f"{p}.experts.3.down_proj.weight_scale_inv"]
    with pytest.raises(UserError, match="missing"):
        map_expert_keys(meta, blocks, shapes)

    fused = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fused[f"{p}.experts.gate_up_proj_scales"] = (8, 64, 2)
    found = map_expert_keys(meta, blocks, fused)
    assert found.get(f"{p}.experts.gate_up_proj_scales").axis == 0
    assert found.layout(blocks[0].index) == "fused"


def test_checkpoint_reads_only_what_is_asked(tmp_path):
    from safetensors.torch import save_file

    t = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    save_file({"x": t}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.info("x").shape == (2, 8, 3)
    ids = [0, 1, 5, 7]
    assert torch.equal(ckpt.experts("x", ids, axis=1), t[:, ids])
    info: TensorInfo = ckpt.info("x")
    data = (tmp_path / "model.safetensors").read_bytes()
    raw = b"".join(data[p.offset : p.offset + p.length] for p in info.expert_pieces(1, ids))
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(2, 4, 3), t[:, ids])
    tensors, _ = read_header(tmp_path / "model.safetensors")
    assert list(tensors) == ["x"]


def test_interrupt_leaves_nothing_behind(tmp_path, monkeypatch):
    import moeprune.surgery as surgery

    model, blocks = _tiny("mixtral")
    src = _save(model, tmp_path / "src", "hub")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    write_marker(out, "model")  # --force replaces only moeprune's own outputs

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(surgery, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        rewrite_checkpoint(src, out, _kept(blocks), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert json.loads((out / "config.json").read_text()) == {"old": True}


# --- the command line --------------------------------------------------------------------------------


def _plan_file(path: Path, model_dir: Path, kept: dict[int, list[int]], **over) -> Path:
    from moeprune.modelio import load_config

    config = load_config(str(model_dir))
    blocks = find_moe_blocks(_model(config.model_type)[0])
    path.write_text(plan_for(config, blocks, kept, **over).dumps())
    return path


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    model, _ = _tiny("mixtral")
    return _save(model, tmp_path_factory.mktemp("mixtral") / "model", "hub")


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory) -> Path:
    model, _ = _tiny("deepseek_v3")
    return _save(model, tmp_path_factory.mktemp("deepseek") / "model", "fused")


def test_cli_prunes(mixtral_dir, tmp_path, capsys):
    kept = _kept(_tiny("mixtral")[1])
    plan = _plan_file(tmp_path / "plan.json", mixtral_dir, kept)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "prune", mixtral_dir, "--plan", plan, "--mode", "remove", "--out", out)
    assert rc == 0, err
    assert json.loads((out / "plan.json").read_text())["kept"] == {str(k): v for k, v in kept.items()}
    rc, _, err = run_cli(capsys, "prune", mixtral_dir, "--plan", plan, "--out", out)
    assert_user_error(rc, err, "not empty", "--force")
    rc, _, err = run_cli(capsys, "prune", mixtral_dir, "--plan", plan, "--out", out, "--force")
    assert rc == 0, err


def _bad_plans(model_dir: Path, tmp: Path, kept: dict[int, list[int]]):
    layers = sorted(kept)
    yield "missing", None, ["does not exist"]
    yield "corrupt", "{not json", ["not valid JSON"]
    yield "type", _plan_file(tmp / "t.json", model_dir, kept, model_type="qwen3_moe"), ["qwen3_moe"]
    yield "experts", _plan_file(tmp / "e.json", model_dir, kept, num_experts=16), ["16 experts"]
    yield (
        "fingerprint",
        _plan_file(tmp / "f.json", model_dir, kept, model_fingerprint="0" * 64),
        ["another model"],
    )
    one = {layers[-1]: kept[layers[-1]]}
    yield "layer", _plan_file(tmp / "l.json", model_dir, one), [f"layer(s) {layers[0]}"]
    # ragged plans (different counts per layer) are accepted now: tests/test_surgery_modes.py


def test_cli_refuses_bad_plans(mixtral_dir, tmp_path, capsys):
    kept = _kept(_tiny("mixtral")[1])
    out = tmp_path / "out"
    for name, plan, words in _bad_plans(mixtral_dir, tmp_path, kept):
        if plan is None:
            plan = tmp_path / "nope.json"
        elif isinstance(plan, str):
            (tmp_path / "c.json").write_text(plan)
            plan = tmp_path / "c.json"
        rc, _, err = run_cli(capsys, "prune", mixtral_dir, "--plan", plan, "--out", out)
        assert_user_error(rc, err, *words)
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_refuses_group_invalid_plan(deepseek_dir, tmp_path, capsys):
    blocks = _tiny("deepseek_v3")[1]
    kept = {b.layer: [2, 3, 4, 5, 6, 7] for b in blocks}  # 2 + 4 in two groups of 4
    plan = _plan_file(tmp_path / "plan.json", deepseek_dir, kept)
    rc, _, err = run_cli(capsys, "prune", deepseek_dir, "--plan", plan, "--out", tmp_path / "out")
    assert_user_error(rc, err, "groups", "--per-group equal")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_bad_models_and_outputs(mixtral_dir, tmp_path, capsys):
    kept = _kept(_tiny("mixtral")[1])
    plan = _plan_file(tmp_path / "plan.json", mixtral_dir, kept)
    rc, _, err = run_cli(capsys, "prune", tmp_path / "no-such-model", "--plan", plan, "--out", tmp_path / "o")
    assert_user_error(rc, err, "does not exist")
    for out in (mixtral_dir, mixtral_dir / "pruned"):
        rc, _, err = run_cli(capsys, "prune", mixtral_dir, "--plan", plan, "--out", out, "--force")
        assert_user_error(rc, err, "input model")
    rc, _, err = run_cli(
        capsys, "prune", mixtral_dir, "--plan", plan, "--out", tmp_path / "o", "--mode", "novice"
    )
    assert_user_error(rc, err, "--mode")
    assert not (tmp_path / "o").exists() and not (mixtral_dir / "pruned").exists()


def test_rewrite_announces_the_source_ranges_ahead_of_the_copy(tmp_path, monkeypatch):
    """write_safetensors tells the kernel (posix_fadvise WILLNEED) which source ranges come next,
    a bounded window ahead of the copy: a pruned checkpoint's kept experts are runs with gaps, and
    with a cold page cache the copy otherwise waited on small readahead windows. Every range is
    announced before it is copied, never more than the window ahead, and the bytes are the
    source's."""
    import os

    from moeprune import checkpoint
    from moeprune.checkpoint import OutTensor, Piece, write_safetensors

    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4)
    pieces = [Piece(src, 80 * i + 7, 40) for i in range(10)]  # 40-byte runs with 40-byte gaps
    events: list[tuple[str, int]] = []
    real_copy = checkpoint._copy_range

    def advise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        events.append(("advise", offset))

    def copy(src_fd, dst, offset, length, progress):
        events.append(("copy", offset))
        real_copy(src_fd, dst, offset, length, progress)

    monkeypatch.setattr(checkpoint, "_PREFETCH", 100)
    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(checkpoint, "_copy_range", copy)
    out = tmp_path / "out.safetensors"
    write_safetensors(out, [OutTensor("t", "U8", (400,), pieces)])

    offsets = [p.offset for p in pieces]
    assert [o for kind, o in events if kind == "copy"] == offsets
    assert [o for kind, o in events if kind == "advise"] == offsets
    for i, offset in enumerate(offsets):
        at = events.index(("copy", offset))
        announced = sum(1 for kind, _ in events[:at] if kind == "advise")
        # announced before copied, and at most the 100-byte window (3 pieces of 40) ahead
        assert i < announced <= i + 3
    assert events[:4] == [("advise", 7), ("advise", 87), ("advise", 167), ("copy", 7)]
    with safe_open(str(out), framework="pt") as fh:
        got = fh.get_tensor("t")
    data = src.read_bytes()
    assert bytes(got.numpy()) == b"".join(data[p.offset : p.offset + 40] for p in pieces)
