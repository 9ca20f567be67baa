"""Quantized checkpoints (fp8 block-wise, mxfp4) read as published: loaded, profiled in memory and
layer by layer, and served by the adaptive model, each equal to its dequantized twin."""

from __future__ import annotations

import json

import pytest
import torch

import moeprune
from _quantize import quantize
from moeprune.errors import UserError
from moeprune.offload import calibrate_sequential
from moeprune.testing.tiny import tiny_model

CASES = {
    # DeepSeek-V3 hub layout: per-expert keys, MLA attention with a partial edge block (24 rows)
    "deepseek_v3-fp8-hub": ("deepseek_v3", "fp8", "hub"),
    # transformers' fused layout: [E, 2I, H] fp8 experts with [E, 2I/b, H/b] scales
    "deepseek_v3-fp8-fused": ("deepseek_v3", "fp8", "fused"),
    "qwen3_moe-fp8-hub": ("qwen3_moe", "fp8", "hub"),
    "gpt_oss-mxfp4": ("gpt_oss", "mxfp4", "fused"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    made = {}
    for name, (model_type, method, layout) in CASES.items():
        out = root / name
        twin = quantize(tiny_model(model_type, seed=3), out, method=method, layout=layout)
        made[name] = (out, twin)
    return made


def _seqs(n=5, length=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("case", list(CASES))
def test_load_equals_the_dequantized_twin(checkpoints, case):
    quant, twin = checkpoints[case]
    a = moeprune.load(quant, dtype=torch.float32)
    b = moeprune.load(twin, dtype=torch.float32)
    assert "dequantized on load by moeprune" in a.moeprune_quantization
    ids = torch.tensor(_seqs(2))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("case", list(CASES))
def test_sequential_profile_equals_the_twin(checkpoints, case):
    """Experts kept as stored (one expert dequantized at a time): every profile tensor equal."""
    quant, twin = checkpoints[case]
    seqs = _seqs()
    a = calibrate_sequential(quant, seqs, batch_size=2, per_sample=True)
    b = calibrate_sequential(twin, seqs, batch_size=2, per_sample=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", ["deepseek_v3-fp8-hub", "gpt_oss-mxfp4"])
def test_profile_in_memory_and_offloaded_agree(checkpoints, case, tmp_path):
    quant, twin = checkpoints[case]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "abc def ghi " * (i + 2)}) + "\n" for i in range(4)))
    from moeprune.api import profile

    kw = dict(data=[data], max_length=32, batch_size=2, dtype="float32", device="cpu")
    mem = profile(str(quant), **kw)
    off = profile(str(quant), offload="sequential", **kw)
    ref = profile(str(twin), **kw)
    for key, value in ref.tensors.items():
        assert torch.equal(mem.tensors[key], value), key
        assert torch.allclose(off.tensors[key].double(), value.double(), rtol=1e-5, atol=1e-6), key


def _tokenizer():
    from moeprune.testing.tiny import byte_tokenizer

    return byte_tokenizer()


def test_unsupported_quantization_is_one_line(checkpoints, tmp_path):
    import shutil

    quant, _ = checkpoints["qwen3_moe-fp8-hub"]
    shutil.copytree(quant, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="compressed-tensors"):
        calibrate_sequential(tmp_path / "m", _seqs(1), batch_size=1)
    with pytest.raises(UserError, match="compressed-tensors"):
        moeprune.load(tmp_path / "m")


def test_a_scale_without_weight_is_refused(tmp_path):
    from moeprune.quant import dequantize_tensors, quant_format

    fmt = quant_format(
        type("C", (), {"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 16]}})()
    )
    w = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    with pytest.raises(UserError, match="has no weight to scale"):
        dequantize_tensors({"a.weight_scale_inv": torch.ones(1, 1)}, fmt, torch.float32)
    with pytest.raises(UserError, match="has no 'a.weight_scale_inv'"):
        dequantize_tensors({"a.weight": w}, fmt, torch.float32)


def test_adaptive_model_on_fp8_equals_the_twin(checkpoints, tmp_path):
    """The adaptive model reads fp8 experts (dequantized when read) and computes what it computes
    on the dequantized twin."""
    from moeprune.adaptive import AdaptiveMoE

    quant, twin = checkpoints["deepseek_v3-fp8-hub"]
    lib = _library(twin, tmp_path)
    a = AdaptiveMoE.from_library(str(quant), lib, dtype=torch.float32, device="cpu")
    b = AdaptiveMoE.from_library(str(twin), lib, dtype=torch.float32, device="cpu")
    assert a.quantization and "dequantized when read" in a.quantization
    assert b.quantization is None
    ids = torch.tensor(_seqs(1))
    for task in lib.tasks:
        a.activate(task)
        b.activate(task)
        with torch.no_grad():
            assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def _library(model_dir, tmp_path):
    from moeprune.api import build_library, profile

    tasks = {}
    for i, text in enumerate(["aaa bbb ccc ", "xyz uvw 123 "]):
        data = tmp_path / f"t{i}.jsonl"
        data.write_text("".join(json.dumps({"text": text * (j + 1)}) + "\n" for j in range(3)))
        out = tmp_path / f"t{i}.profile.safetensors"
        kw = dict(data=[data], out=out, max_length=24, dtype="float32", device="cpu")
        profile(str(model_dir), **kw)
        tasks[f"task{i}"] = out
    return build_library(str(model_dir), tasks, keep=4, out=tmp_path / "lib", dtype="float32", device="cpu")


def test_transformers_fp8_experts_module_runs_per_expert():
    """On a GPU transformers keeps fp8 experts quantized (FP8Experts: fp8 [E, 2I, H] weights beside
    [E, ...] scales); moeprune's per-expert computation dequantizes one expert of it and must give
    what the dequantized experts give. Built on CPU from the same module transformers swaps in."""
    from transformers.integrations.finegrained_fp8 import FP8Experts

    from _quantize import _fp8
    from moeprune.arch.experts import ExpertsLayout, single_expert_forward
    from moeprune.quant import dequantize_fp8

    model = tiny_model("deepseek_v3", seed=5)
    plain = model.model.layers[1].mlp.experts
    fp8 = FP8Experts(model.config, block_size=(16, 16))
    for name in ("gate_up_proj", "down_proj"):
        w, s = _fp8(getattr(plain, name).detach(), (16, 16))
        getattr(fp8, name).data = w
        getattr(fp8, name + "_scale_inv").data = s
        getattr(plain, name).data = dequantize_fp8(w, s, (16, 16), torch.float32)
    assert ExpertsLayout.of(fp8).tensors == ExpertsLayout.of(plain).tensors
    x = torch.randn(5, model.config.hidden_size)
    for e in range(plain.num_experts):
        assert torch.equal(single_expert_forward(fp8, e, x), single_expert_forward(plain, e, x))
