"""Pruning quantized checkpoints (fp8 block-wise per-expert and fused, mxfp4) never dequantizes: the
kept experts' stored bytes and scales are copied (renumbered, or sliced on the expert axis), the
rest byte for byte, ``quantization_config`` kept; the output loads where the input loads, and its
dequantized twin gives the logits of the input's twin with the removed experts masked (float32)."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import pytest
import torch

import moeprune
from _cli import assert_user_error, run_cli
from moeprune.arch import BlockControl, find_moe_blocks, kept_controls, patch_moe
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.quantized import LAYOUTS, dequantized_twin, partial_blocks, quantized_tiny, read_tensors
from moeprune.testing.tiny import tiny_model

TOL = {"rtol": 1e-5, "atol": 1e-5}
NAMES = list(LAYOUTS)
STOCK = [n for n in NAMES if not n.endswith("fused")]  # CPU transformers cannot dequantize FP8Experts
E = 8
# tiny DeepSeek-V3 has one dense and one MoE layer: two MoE layers, for ragged keeps and padding
MODEL_KWARGS = {"deepseek_v3": {"num_hidden_layers": 3}}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """name -> (quantized checkpoint, its dequantized twin); fp8 in 16x16 blocks (DeepSeek's
    kv_a_proj_with_mqa then has a partial edge block)."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            model_type, fmt, kwargs = LAYOUTS[name]
            if fmt == "fp8":
                kwargs = {**kwargs, "block_size": (16, 16)}
            base = tmp_path_factory.mktemp(name)
            src = quantized_tiny(
                model_type, base / "q", fmt, model_kwargs=MODEL_KWARGS.get(model_type), **kwargs
            )
            made[name] = (src, dequantized_twin(src, base / "twin"))
        return made[name]

    return get


@cache
def _blocks(name: str):
    model_type = LAYOUTS[name][0]
    return find_moe_blocks(tiny_model(model_type, **MODEL_KWARGS.get(model_type, {})))


def _kept(name: str, ragged: bool = False) -> dict[int, list[int]]:
    """6 of 8 experts per layer (4 in every other layer when ``ragged``), the same number from each
    routing group, different ones per layer."""
    kept = {}
    for j, b in enumerate(_blocks(name)):
        drop = 2 if not (ragged and j % 2) else 4
        groups = max(b.spec.n_group, 1)
        size = b.num_experts // groups
        ids = []
        for g in range(groups):
            gone = {(b.layer + g + i) % size for i in range(drop // groups)}
            ids += [g * size + i for i in range(size) if i not in gone]
        kept[b.layer] = ids
    return kept


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _stock(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    return model.eval()


def _logits(model, **patch) -> torch.Tensor:
    with torch.no_grad():
        if not patch:
            return model(_ids(), use_cache=False).logits
        with patch_moe(model, **patch):
            return model(_ids(), use_cache=False).logits


def _masked(model, kept) -> torch.Tensor:
    blocks = find_moe_blocks(model)
    return _logits(model, blocks=blocks, controls=kept_controls(blocks, kept))


def _raw(ckpt: Checkpoint, key: str) -> bytes:
    info = ckpt.info(key)
    with open(info.file, "rb") as fh:
        fh.seek(info.start)
        return fh.read(info.nbytes)


_PER_EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")


def _check_bytes(
    src: Path, out: Path, kept: dict[int, list[int]], slots: dict[int, list[int | None]] | None = None
):
    """Every output tensor is its source's bytes: whole, renumbered (per-expert keys) or the kept
    entries of its expert axis; padding slots (None) are zeros; dtypes as stored. Returns the
    number of expert-axis tensors seen (scales, mxfp4 blocks and router rows included)."""
    a, b = Checkpoint.open(src), Checkpoint.open(out)
    sliced = 0
    expected = set()
    for key, info in a.tensors.items():
        m = _PER_EXPERT.match(key)
        layer = int(re.search(r"layers\.(\d+)\.", key).group(1)) if "layers." in key else None
        if m and layer in kept:
            row = (slots or kept)[layer]
            if int(m.group(2)) in row:
                new = f"{m.group(1)}{row.index(int(m.group(2)))}{m.group(3)}"
                assert b.info(new).dtype == info.dtype and b.info(new).shape == info.shape, key
                assert _raw(b, new) == _raw(a, key), key
                expected.add(new)
            continue
        expected.add(key)
        o = b.info(key)
        assert o.dtype == info.dtype, key
        if o.shape == info.shape:
            assert _raw(b, key) == _raw(a, key), key
            continue
        # an expert-axis tensor (axis 0): fused weights, their scales / blocks, router rows, biases
        row = (slots or kept)[layer]
        assert info.shape[0] == E and o.shape == (len(row), *info.shape[1:]), (key, o.shape)
        entry, whole = info.entry_bytes(0), _raw(a, key)
        want = b"".join(whole[e * entry : (e + 1) * entry] if e is not None else bytes(entry) for e in row)
        if _raw(b, key) != want:  # a dead expert's selection bias is not zero: compare the kept rows
            got = _raw(b, key)
            for pos, e in enumerate(row):
                if e is not None:
                    assert got[pos * entry : (pos + 1) * entry] == whole[e * entry : (e + 1) * entry], key
            assert "bias" in key, key
        sliced += 1
    for key in b.tensors:
        if _PER_EXPERT.match(key) and key not in expected:  # padding experts of the per-expert layout
            assert slots is not None and not any(_raw(b, key)), key
            expected.add(key)
    assert set(b.tensors) == expected
    return sliced


# --- remove ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_prune_copies_quantized_experts_as_stored(name, fixtures, tmp_path):
    src, twin = fixtures(name)
    kept = _kept(name)
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    out = tmp_path / "out"
    assert result.stock and result.quantization is not None and result.bytes_out < result.bytes_in
    sliced = _check_bytes(src, out, kept)
    fused = name.endswith("fused") or name.startswith("gpt-oss")
    assert (sliced >= 4 * len(kept)) if fused else (sliced >= len(kept))  # weights + scales (+ rows)
    config, original = (json.loads((p / "config.json").read_text()) for p in (out, src))
    assert config["quantization_config"] == original["quantization_config"]
    assert partial_blocks(out) == partial_blocks(src)
    # the output's dequantized twin is the input's twin with the removed experts masked
    reference = _masked(_stock(twin), kept)
    pruned_twin = dequantized_twin(out, tmp_path / "out-twin")
    assert "quantization_config" not in json.loads((pruned_twin / "config.json").read_text())
    torch.testing.assert_close(_logits(_stock(pruned_twin)), reference, **TOL)


@pytest.mark.parametrize("name", STOCK)
def test_pruned_checkpoint_loads_where_the_input_loads(name, fixtures, tmp_path):
    """Stock transformers (CPU: it dequantizes on load) loads the pruned checkpoint as it loads the
    input, and gives the input's logits with the removed experts masked (its dequantizer's error on
    partial blocks, DeepSeek's attention, is the same on both sides)."""
    src, _ = fixtures(name)
    kept = _kept(name)
    rewrite_checkpoint(src, tmp_path / "out", kept)
    pruned = _stock(tmp_path / "out")
    assert [b.num_experts for b in find_moe_blocks(pruned)] == [len(v) for v in kept.values()]
    torch.testing.assert_close(_logits(pruned), _masked(_stock(src), kept), **TOL)


def test_sharded_quantized_output_keeps_the_index_right(fixtures, tmp_path):
    src, _ = fixtures("deepseek-fp8")
    result = rewrite_checkpoint(src, tmp_path / "out", _kept("deepseek-fp8"), max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint.open(tmp_path / "out")
    assert len(result.shards) > 1 and len(ckpt.shard_files) == len(result.shards)
    assert index["metadata"]["total_size"] == ckpt.total_bytes == result.bytes_out
    assert all(ckpt.info(k).file.name == v for k, v in index["weight_map"].items())
    scales = [k for k in index["weight_map"] if k.endswith("weight_scale_inv")]
    assert all(k[: -len("_scale_inv")] in index["weight_map"] for k in scales)


# --- ragged, pad-uniform, novice ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen3-fp8", "minimax-fp8", "gpt-oss-mxfp4"])
def test_ragged_quantized_checkpoint(name, fixtures, tmp_path):
    """Different counts per layer: bytes copied as for a uniform keep; moeprune's layout record and
    quantization_config side by side; the twin loads with moeprune.load and matches."""
    src, twin = fixtures(name)
    kept = _kept(name, ragged=True)
    assert len({len(v) for v in kept.values()}) > 1
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    assert result.ragged and not result.stock
    _check_bytes(src, tmp_path / "out", kept)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moeprune"]["experts_per_layer"] == {str(k): len(v) for k, v in kept.items()}
    assert "quantization_config" in config
    pruned = moeprune.load(dequantized_twin(tmp_path / "out", tmp_path / "twin"), dtype=torch.float32)
    torch.testing.assert_close(_logits(pruned), _masked(_stock(twin), kept), **TOL)


@pytest.mark.parametrize("name", ["deepseek-fp8", "minimax-fp8", "deepseek-fp8-fused"])
def test_pad_uniform_quantized_checkpoint(name, fixtures, tmp_path):
    """Dead padding experts are zero bytes with zero scales (they dequantize to 0) and a selection
    bias that never selects them: the checkpoint loads stock and matches the masked reference."""
    from moeprune.arch.pruned import padding_slots

    src, twin = fixtures(name)
    kept = _kept(name, ragged=True)
    top = max(len(v) for v in kept.values())
    result = rewrite_checkpoint(src, tmp_path / "out", kept, pad_uniform=True)
    assert result.padded and result.stock
    slots = {b.layer: padding_slots(b, kept[b.layer], top) for b in _blocks(name)}
    assert any(None in v for v in slots.values())
    _check_bytes(src, tmp_path / "out", kept, slots)
    reference = _masked(_stock(twin), kept)
    padded_twin = dequantized_twin(tmp_path / "out", tmp_path / "twin")
    torch.testing.assert_close(_logits(_stock(padded_twin)), reference, **TOL)
    if not name.endswith("fused"):
        torch.testing.assert_close(_logits(_stock(tmp_path / "out")), _masked(_stock(src), kept), **TOL)


def test_pad_uniform_refused_for_quantized_softmax_routers(fixtures, tmp_path):
    src, _ = fixtures("gpt-oss-mxfp4")
    with pytest.raises(UserError, match="no additive selection bias"):
        rewrite_checkpoint(src, tmp_path / "out", _kept("gpt-oss-mxfp4", ragged=True), pad_uniform=True)
    assert not (tmp_path / "out").exists()


def _novices(name: str, kept) -> dict[int, torch.Tensor]:
    """Novice vectors that bfloat16 holds exactly: the checkpoint stores them in the router's
    (DeepSeek) or the expert biases' (gpt-oss) dtype, bfloat16 in these releases."""
    gen = torch.Generator().manual_seed(7)
    return {
        b.layer: (torch.randn(E - len(kept[b.layer]), 64, generator=gen) * 0.5).bfloat16().float()
        for b in _blocks(name)
    }


def _novice_reference(model, kept, novices) -> torch.Tensor:
    blocks = find_moe_blocks(model)
    controls = {}
    for b in blocks:
        replaced = sorted(set(range(b.num_experts)) - set(kept[b.layer]))
        controls[b.index] = BlockControl(novices=dict(zip(replaced, novices[b.layer], strict=True)))
    return _logits(model, blocks=blocks, controls=controls)


@pytest.mark.parametrize(
    ("name", "pad"), [("deepseek-fp8", False), ("gpt-oss-mxfp4", False), ("gpt-oss-mxfp4", True)]
)
def test_novice_quantized_checkpoint(name, pad, fixtures, tmp_path):
    """Kept experts stay quantized; the novices are float vectors beside them (a buffer read by
    moeprune.load), or, with --pad-uniform on gpt-oss, zero blocks and scales with the vector as
    down bias (a stock checkpoint)."""
    src, twin = fixtures(name)
    kept = _kept(name, ragged=True)
    novices = _novices(name, kept)
    result = rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices, pad_uniform=pad)
    assert result.stock == pad
    out = tmp_path / "out"
    if not pad:
        _check_bytes_novice(src, out, kept)
    reference = _novice_reference(_stock(twin), kept, novices)
    pruned_twin = dequantized_twin(out, tmp_path / "twin")
    loaded = _stock(pruned_twin) if pad else moeprune.load(pruned_twin, dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), reference, **TOL)
    if pad:  # the quantized checkpoint itself, loaded by stock transformers
        torch.testing.assert_close(_logits(_stock(out)), _novice_reference(_stock(src), kept, novices), **TOL)


def _check_bytes_novice(src: Path, out: Path, kept) -> None:
    """Novice buffer mode: the kept experts as a remove writes them, the routers whole, and one float
    buffer per layer."""
    b = Checkpoint.open(out)
    buffers = [k for k in b.tensors if k.endswith("novice_outputs")]
    assert len(buffers) == len(kept) and all(b.info(k).dtype == "BF16" for k in buffers)
    remove = out.parent / "remove"
    rewrite_checkpoint(src, remove, kept)
    want = Checkpoint.open(remove)
    assert set(b.tensors) - set(buffers) == set(want.tensors)
    a = Checkpoint.open(src)
    for key in want.tensors:  # routers whole (novice routing is over all experts), experts as removed
        whole = not _PER_EXPERT.match(key) and b.info(key).shape == a.info(key).shape
        assert _raw(b, key) == _raw(a if whole else want, key), key
    assert any(b.info(k).shape != want.info(k).shape for k in want.tensors)  # the routers kept E rows


# --- refusals, CLI -----------------------------------------------------------------------------


def test_unsupported_quantization_is_refused(tmp_path):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="GPTQ"):
        rewrite_checkpoint(tmp_path / "src", tmp_path / "out", _kept("qwen3-fp8"))
    assert not (tmp_path / "out").exists()


def test_stray_tensor_in_quantized_checkpoint_is_refused(fixtures, tmp_path):
    """A tensor that is neither a model tensor nor a quantized weight's companion would make the
    output unloadable: refused as in an unquantized checkpoint (quantized ones were let through)."""
    from safetensors.torch import save_file

    src, _ = fixtures("qwen3-fp8")
    copy = tmp_path / "src"
    copy.mkdir()
    for p in src.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    tensors = read_tensors(copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    mine = {k: tensors[k] for k, v in index["weight_map"].items() if v == last}
    mine["model.layers.1.self_attn.extra.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(mine, str(copy / last), metadata={"format": "pt"})
    index["weight_map"]["model.layers.1.self_attn.extra.weight"] = last
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="unexpected keys .*extra.weight"):
        rewrite_checkpoint(copy, tmp_path / "out", _kept("qwen3-fp8"))
    assert not (tmp_path / "out").exists()


def test_cli_prunes_a_quantized_checkpoint(fixtures, tmp_path, capsys):
    from moeprune.modelio import load_config
    from moeprune.plan import Plan
    from moeprune.profile import fingerprint_fields, model_fingerprint

    src, _ = fixtures("deepseek-fp8")
    kept = _kept("deepseek-fp8")
    blocks = _blocks("deepseek-fp8")
    config = load_config(str(src))
    plan = Plan(
        model_fingerprint=model_fingerprint(fingerprint_fields(config, blocks)),
        model_type="deepseek_v3",
        layers=sorted(kept),
        num_experts=E,
        top_k=blocks[0].top_k,
        method="frequency",
        kept=kept,
    )
    (tmp_path / "plan.json").write_text(plan.dumps())
    rc, _, err = run_cli(capsys, "prune", src, "--plan", tmp_path / "plan.json", "--out", tmp_path / "out")
    assert rc == 0, err
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "fp8"
    )
    _check_bytes(src, tmp_path / "out", kept)
    rc, _, err = run_cli(capsys, "prune", src, "--plan", tmp_path / "plan.json", "--out", tmp_path / "out")
    assert_user_error(rc, err, "not empty")


def test_multi_token_prediction_layer_is_left_out(fixtures, tmp_path):
    """DeepSeek-V3/R1 publish a multi-token-prediction layer (``model.layers.61``, its own 256
    experts, ignored by transformers). No profile measures it, and copied whole it would contradict
    the pruned expert count: the output leaves it out and says ``num_nextn_predict_layers: 0``."""
    from safetensors.torch import save_file

    src, _ = fixtures("deepseek-fp8")
    copy = tmp_path / "src"
    copy.mkdir()
    for p in src.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    tensors = read_tensors(copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    mine = {k: tensors[k] for k, v in index["weight_map"].items() if v == last}
    mtp = {k.replace(".layers.2.", ".layers.61."): v.clone() for k, v in tensors.items() if ".layers.2." in k}
    mtp["model.layers.61.eh_proj.weight"] = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    mtp["model.layers.61.eh_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file({**mine, **mtp}, str(copy / last), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(mtp, last))
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (copy / "config.json").write_text(json.dumps(cfg))

    result = rewrite_checkpoint(copy, tmp_path / "out", _kept("deepseek-fp8"))
    assert result.dropped_mtp == len(mtp)
    out_keys = set(Checkpoint.open(tmp_path / "out").tensors)
    assert not any(".layers.61." in k for k in out_keys)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"layer left out ({len(mtp)} tensors" in card and "fp8 (e4m3, 16x16 blocks)" in card
    plain = rewrite_checkpoint(src, tmp_path / "plain", _kept("deepseek-fp8"))
    assert plain.dropped_mtp == 0 and set(Checkpoint.open(tmp_path / "plain").tensors) == out_keys
