"""The quantized fixtures (moeprune.testing.quantized) are what the releases publish: key names,
dtypes, scale shapes, config fields and shard index; transformers' own loader accepts them; and
their dequantized twins hold exactly the values the stored bytes mean."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from moeprune.checkpoint import Checkpoint
from moeprune.quant import dequantize_fp8
from moeprune.testing.quantized import (
    FP8_MAX,
    LAYOUTS,
    MXFP4_MODULES_TO_NOT_CONVERT,
    dequantized_twin,
    partial_blocks,
    quantize_fp8,
    quantize_mxfp4,
    quantized_tiny,
    read_tensors,
)
from moeprune.testing.tiny import tiny_model

# (layout name, block size): [8, 8] divides every tiny width; [16, 16] leaves DeepSeek's
# kv_a_proj_with_mqa (24 rows) with a partial edge block, as DeepSeek-V3's 576 rows are
CASES = [
    ("deepseek-fp8", (16, 16)),
    ("deepseek-fp8", (8, 8)),
    ("qwen3-fp8", (16, 16)),
    ("minimax-fp8", (16, 16)),
    ("deepseek-fp8-fused", (16, 16)),
    ("gpt-oss-mxfp4", None),
]
IDS = [f"{name}-{block[0]}" if block else name for name, block in CASES]


def _write(tmp_path: Path, name: str, block, **extra) -> Path:
    model_type, fmt, kwargs = LAYOUTS[name]
    if block is not None:
        kwargs = {**kwargs, "block_size": block}
    return quantized_tiny(model_type, tmp_path / "q", fmt, **kwargs, **extra)


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    return model.eval(), {k: sorted(v) for k, v in info.items() if v}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids(), use_cache=False).logits


def _blockwise(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 dequantization written out block by block (partial edge blocks included)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    rows, cols = q.shape[-2:]
    for i in range(math.ceil(rows / block[0])):
        for j in range(math.ceil(cols / block[1])):
            r = slice(i * block[0], (i + 1) * block[0])
            c = slice(j * block[1], (j + 1) * block[1])
            out[..., r, c] = q[..., r, c].to(torch.float32) * s[..., i, j, None, None].to(torch.float32)
    return out


# --- layout as published ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "block"), CASES, ids=IDS)
def test_fixture_is_laid_out_as_published(name, block, tmp_path):
    src = _write(tmp_path, name, block)
    config = json.loads((src / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint.open(src)
    assert len(ckpt.shard_files) > 1
    assert [f.name for f in ckpt.shard_files] == sorted(set(index["weight_map"].values()))
    assert re.fullmatch(r"model-00001-of-0000\d\.safetensors", ckpt.shard_files[0].name)
    assert index["metadata"]["total_size"] == ckpt.total_bytes
    assert set(index["weight_map"]) == set(ckpt.tensors)
    dtypes = {k: i.dtype for k, i in ckpt.tensors.items()}
    quant = config["quantization_config"]
    assert config["dtype"] == "bfloat16"
    if name == "gpt-oss-mxfp4":
        assert quant == {"modules_to_not_convert": MXFP4_MODULES_TO_NOT_CONVERT, "quant_method": "mxfp4"}
        e, h, i = 8, 64, 128  # tiny gpt-oss: 8 experts, hidden 64, intermediate 128
        layer = "model.layers.0.mlp.experts"
        for proj, rows, cols in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
            assert ckpt.info(f"{layer}.{proj}_blocks").shape == (e, rows, cols // 32, 16)
            assert ckpt.info(f"{layer}.{proj}_scales").shape == (e, rows, cols // 32)
            assert dtypes[f"{layer}.{proj}_blocks"] == dtypes[f"{layer}.{proj}_scales"] == "U8"
            assert dtypes[f"{layer}.{proj}_bias"] == "BF16"
            assert f"{layer}.{proj}" not in dtypes
        assert {d for k, d in dtypes.items() if not k.endswith(("_blocks", "_scales"))} == {"BF16"}
        return
    want = {"activation_scheme": "dynamic", "quant_method": "fp8", "weight_block_size": list(block)}
    if name == "deepseek-fp8" or name == "deepseek-fp8-fused":
        assert quant == {**want, "fmt": "e4m3"}  # DeepSeek-V3/R1 exactly
    elif name == "minimax-fp8":
        assert quant == {
            **want,
            "fmt": "float8_e4m3fn",
            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
        }
    else:
        skip = quant.pop("modules_to_not_convert")
        assert quant == {**want, "fmt": "e4m3"}
        assert {"lm_head", "model.embed_tokens", "model.norm", "model.layers.0.mlp.gate"} <= set(skip)
        assert "model.layers.1.post_attention_layernorm" in skip
    # every fp8 weight has its scale grid, in the style's dtype; nothing else is 8-bit
    scale_dtype = "BF16" if name == "qwen3-fp8" else "F32"
    for key, dtype in dtypes.items():
        if dtype == "F8_E4M3":
            scale = (
                key[: -len(".weight")] + ".weight_scale_inv"
                if key.endswith(".weight")
                else key + "_scale_inv"
            )
            rows, cols = ckpt.info(key).shape[-2:]
            lead = ckpt.info(key).shape[:-2]
            assert ckpt.info(scale).shape == (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))
            assert dtypes[scale] == scale_dtype
        elif not key.endswith("_scale_inv"):
            assert dtype in ("BF16", "F32"), key
    f32 = sorted(k for k, d in dtypes.items() if d == "F32" and not k.endswith("_scale_inv"))
    if name == "minimax-fp8":  # router rows and selection bias in float32, as MiniMax-M2 stores them
        assert f32 and all(k.endswith(("gate.weight", "e_score_correction_bias")) for k in f32)
    elif name.startswith("deepseek"):
        assert f32 and all(k.endswith("e_score_correction_bias") for k in f32)
    else:
        assert not f32
    quantized = {k for k, d in dtypes.items() if d == "F8_E4M3"}
    assert not any(re.search(r"(embed_tokens|lm_head|\.gate)\.weight$", k) for k in quantized)
    if name == "deepseek-fp8":
        layer = "model.layers.1"
        for k in (
            "self_attn.kv_a_proj_with_mqa.weight",
            "self_attn.q_b_proj.weight",
            "mlp.shared_experts.down_proj.weight",
            "mlp.experts.7.gate_proj.weight",
        ):
            assert f"{layer}.{k}" in quantized
        assert "model.layers.0.mlp.gate_proj.weight" in quantized  # the dense first layer
        assert dtypes[f"{layer}.mlp.gate.weight"] == "BF16"
    if name == "minimax-fp8":
        assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in quantized
    if name == "deepseek-fp8-fused":
        assert ckpt.info("model.layers.1.mlp.experts.gate_up_proj").shape == (8, 64, 64)
        assert ckpt.info("model.layers.1.mlp.experts.gate_up_proj_scale_inv").shape == (8, 4, 4)
    assert bool(partial_blocks(src)) == (name.startswith("deepseek") and block == (16, 16))


def _renamed_module(model, key: str) -> str:
    """The module of the model a checkpoint weight belongs to (per-expert keys: the experts module)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    name = apply_renamings(key, renamings)
    name = re.sub(r"\.experts\.\d+\..*$", ".experts", name)
    return re.sub(r"\.(weight|gate_up_proj|down_proj)$", "", name)


@pytest.mark.parametrize(("name", "block"), [c for c in CASES if c[1] is not None], ids=IDS[:-1])
def test_fp8_fixture_quantizes_what_transformers_fp8_model_holds(name, block, tmp_path):
    """The modules stored in fp8 are exactly those transformers' fp8 quantizer turns into FP8Linear /
    FP8Experts (what its GPU path loads); the fused layout is that model's state dict, key for key."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    src = _write(tmp_path, name, block)
    config = AutoConfig.from_pretrained(src)
    quantizer = AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantizer.preprocess_model(model)
    fp8_modules = {
        n
        for n, m in model.named_modules()
        if type(m).__name__ in ("FP8Linear",) or "FP8Experts" in type(m).__name__
    }
    ckpt = Checkpoint.open(src)
    stored = {_renamed_module(model, k) for k, i in ckpt.tensors.items() if i.dtype == "F8_E4M3"}
    assert stored == fp8_modules
    if name.endswith("fused"):
        state = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
        names = {"F8_E4M3": "torch.float8_e4m3fn", "F32": "torch.float32", "BF16": "torch.float32"}
        assert set(state) == set(ckpt.tensors)
        for key, info in ckpt.tensors.items():
            assert state[key][0] == info.shape, key
            if info.dtype != "BF16":  # bf16 tensors are loaded into the model's float dtype
                assert state[key][1] == names[info.dtype], key


# --- values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "block"), CASES, ids=IDS)
def test_twin_holds_the_values_the_bytes_mean(name, block, tmp_path):
    """The twin has the keys of the float checkpoint, the stored tensors dequantized block by block
    (written out here, partial blocks included) or upcast, and is close to the float model."""
    model_type, fmt, kwargs = LAYOUTS[name]
    src = _write(tmp_path, name, block)
    twin = dequantized_twin(src, tmp_path / "twin")
    q, t = read_tensors(src), read_tensors(twin)
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "float", save_original_format=kwargs.get("layout") == "per-expert")
    reference = read_tensors(tmp_path / "float")
    assert set(t) == set(reference)
    assert all(v.dtype == torch.float32 for v in t.values())
    assert "quantization_config" not in json.loads((twin / "config.json").read_text())
    for key, value in t.items():
        if fmt == "mxfp4" and key + "_blocks" in q:
            blocks, scales = q[key + "_blocks"], q[key + "_scales"]
            lut = torch.tensor(
                [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
            )
            pairs = torch.stack((lut[(blocks & 15).long()], lut[(blocks >> 4).long()]), -1).flatten(-2)
            want = (pairs * torch.exp2(scales.float() - 127).unsqueeze(-1)).flatten(-2).transpose(-1, -2)
        elif key in q and q[key].dtype == torch.float8_e4m3fn:
            scale = (
                key[: -len(".weight")] + ".weight_scale_inv"
                if key.endswith(".weight")
                else key + "_scale_inv"
            )
            want = _blockwise(q[key], q[scale], block)
        else:
            want = q[key].to(torch.float32)
        assert torch.equal(value, want), key
        # quantization error: fp8 e4m3 keeps 3 mantissa bits, e2m1 one
        tol = 0.5 if fmt == "mxfp4" else 0.07
        err = (value - reference[key]).abs().max()
        assert err <= tol * reference[key].abs().max() + 1e-6, (key, float(err))


@pytest.mark.parametrize(("name", "block"), CASES, ids=IDS)
def test_transformers_loads_the_fixture_and_its_twin(name, block, tmp_path):
    """Stock transformers loads every per-expert fp8 and mxfp4 fixture on CPU (it dequantizes) with
    no missing or unexpected key, and, where no block is partial, with the twin's logits exactly.
    The fused fp8 layout only loads where FP8Experts runs (GPU): on CPU transformers leaves its
    scales unused (checked here, so that a transformers that learns it shows up)."""
    src = _write(tmp_path, name, block)
    twin = dequantized_twin(src, tmp_path / "twin")
    model, info = _load(src)
    reference, twin_info = _load(twin)
    assert not twin_info
    if name.endswith("fused"):
        assert set(info) == {"unexpected_keys"}
        assert all(k.endswith("_scale_inv") and ".experts." in k for k in info["unexpected_keys"])
        return
    assert not info, info
    if not partial_blocks(src):
        torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


def test_ue8m0_scales_stored_as_float32_are_multipliers(tmp_path):
    """DeepSeek-V3.1 says scale_fmt "ue8m0" and stores its power-of-two scales as float32: they
    are multipliers (moeprune read them as exponent bytes, and every value came out wrong)."""
    src = _write(tmp_path, "deepseek-fp8", (8, 8), scale_fmt="ue8m0")
    assert json.loads((src / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    scale = read_tensors(src)["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"]
    assert scale.dtype == torch.float32 and torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    twin = dequantized_twin(src, tmp_path / "twin")
    model, info = _load(src)
    assert not info
    torch.testing.assert_close(_logits(model), _logits(_load(twin)[0]), rtol=0, atol=0)


def test_quantizers_round_trip():
    """Values an fp8 block / an mxfp4 block can hold come back exactly; others within half a step."""
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    q, s = quantize_fp8(w, (16, 16))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    assert float(_blockwise(q, s, (16, 16)).abs().amax()) == pytest.approx(float(w.abs().max()), rel=1e-6)
    assert q.to(torch.float32).abs().amax() == FP8_MAX  # the largest value of each block maps to 448
    exact = _blockwise(q, s, (16, 16))
    q2, s2 = quantize_fp8(exact, (16, 16))
    assert torch.equal(dequantize_fp8(q2, s2, (16, 16)), exact)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]) * 4  # one block, largest 24 = 6 * 2^2
    rows = torch.cat([grid, -grid, grid.flip(0), -grid.flip(0)]).reshape(1, 32)
    blocks, scales = quantize_mxfp4(rows)
    assert blocks.shape == (1, 1, 16) and scales.tolist() == [[129]]
    from moeprune.quant import dequantize_mxfp4

    assert torch.equal(dequantize_mxfp4(blocks, scales), rows)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    blocks, scales = quantize_mxfp4(x)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)  # e2m1 steps are at most 2: half is 1
    assert ((dequantize_mxfp4(blocks, scales) - x).abs() <= step).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.ones(2, 40))


def test_writers_refuse_what_no_release_stores(tmp_path):
    with pytest.raises(ValueError, match="no per-expert hub layout"):
        quantized_tiny("gpt_oss", tmp_path / "a", "fp8", layout="per-expert", block_size=(16, 16))
    with pytest.raises(ValueError, match="taller than the fused gate_up_proj"):
        quantized_tiny("deepseek_v3", tmp_path / "b", "fp8", layout="fused", block_size=(128, 128))
    from transformers import LlamaConfig, LlamaForCausalLM

    from moeprune.testing.quantized import write_mxfp4

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="no fused expert tensors"):
        write_mxfp4(dense, tmp_path / "c")


# --- random checkpoints streamed at any width (the real-width benchmark's) -------------------------

RANDOM_CASES = [("deepseek_v3", "fp8"), ("qwen3_moe", "fp8"), ("minimax_m2", "fp8"), ("gpt_oss", "mxfp4")]


@pytest.mark.parametrize(("model_type", "fmt"), RANDOM_CASES, ids=[c[0] for c in RANDOM_CASES])
def test_random_checkpoint_has_the_layout_of_the_fixture(model_type, fmt, tmp_path):
    """random_fp8 / random_mxfp4 (streamed, no model built) write what write_fp8 / write_mxfp4
    write for the same config: keys, dtypes, shapes, shards, config; every stored value is
    finite, no two experts are the same bytes, and stock transformers loads it with no missing or
    unexpected key into finite logits."""
    from moeprune.testing.quantized import random_fp8, random_mxfp4, write_fp8, write_mxfp4

    model = tiny_model(model_type)
    if fmt == "fp8":
        write_fp8(model, tmp_path / "fixture", block_size=(16, 16))
        random_fp8(model.config, tmp_path / "random", block_size=(16, 16), shard_bytes=64 * 1024)
    else:
        write_mxfp4(model, tmp_path / "fixture")
        random_mxfp4(model.config, tmp_path / "random", shard_bytes=64 * 1024)
    want, got = Checkpoint.open(tmp_path / "fixture"), Checkpoint.open(tmp_path / "random")
    assert {k: (i.dtype, i.shape) for k, i in got.tensors.items()} == {
        k: (i.dtype, i.shape) for k, i in want.tensors.items()
    }
    assert [f.name for f in got.shard_files] == [f.name for f in want.shard_files]
    index = json.loads((tmp_path / "random" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == got.total_bytes
    config = json.loads((tmp_path / "random" / "config.json").read_text())
    assert config == json.loads((tmp_path / "fixture" / "config.json").read_text())

    tensors = read_tensors(tmp_path / "random")
    for key, t in tensors.items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t.to(torch.float32)).all()), key
    experts = [
        t.view(torch.uint8)
        for k, t in tensors.items()
        if re.search(r"experts\.\d+\.(gate_proj|w1)\.weight$", k)
    ]
    fused = [t for k, t in tensors.items() if k.endswith("gate_up_proj_blocks")]
    experts += [e for t in fused for e in t]
    assert len(experts) >= 8
    assert len({bytes(e.flatten().numpy()) for e in experts}) == len(experts)

    loaded, info = _load(tmp_path / "random")
    assert not info, info
    assert bool(torch.isfinite(_logits(loaded)).all())
