"""The full-size headers-only layouts (moeprune.testing.layouts) match what the releases publish,
load as their models' configs, and take (almost) no disk."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from moeprune.arch import find_moe_blocks
from moeprune.checkpoint import Checkpoint
from moeprune.modelio import build_on_meta, load_config
from moeprune.testing.layouts import PUBLISHED, headers_only_copy, layout_tensors, write_layout

# (MoE layers, experts, top-k, routing groups, first shard, last shard)
EXPECTED = {
    "deepseek-r1": (58, 256, 8, 8, "model-00001-of-000163.safetensors", "model-00163-of-000163.safetensors"),
    "qwen3-235b-a22b": (
        94,
        128,
        8,
        1,
        "model-00001-of-00118.safetensors",
        "model-00118-of-00118.safetensors",
    ),
    "gpt-oss-120b": (36, 128, 4, 1, "model-00000-of-00014.safetensors", "model-00014-of-00014.safetensors"),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {name: write_layout(name, base / name) for name in PUBLISHED}


def _params(name: str) -> Counter:
    counts: Counter = Counter()
    for _, dtype, shape in layout_tensors(name):
        counts[dtype] += math.prod(shape)
    return counts


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_layout_matches_the_published_counts(layouts, name):
    pub = PUBLISHED[name]
    d = layouts[name]
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) == pub.shards
    assert (shards[0].name, shards[-1].name) == EXPECTED[name][4:]
    assert dict(_params(name)) == pub.params  # parameters per dtype, as the hub API lists them
    ckpt = Checkpoint.open(d)  # every header valid, every shard the size its header says
    assert ckpt.total_bytes == pub.tensor_bytes
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == pub.tensor_bytes
    assert len(index["weight_map"]) == len(ckpt.tensors)
    if pub.tensors is not None:
        assert len(ckpt.tensors) == pub.tensors
    if pub.file_bytes is not None:
        # only the headers differ from the download's (the published shards group tensors differently)
        files = sum(p.stat().st_size for p in shards)
        assert abs(files - pub.file_bytes) < 1e-5 * pub.file_bytes, (files, pub.file_bytes)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_layout_takes_no_disk(layouts, name):
    shards = list(layouts[name].glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    used = sum(p.stat().st_blocks * 512 for p in shards)
    assert size > 6e10
    assert used < 64 * 2**20 and used < 1e-4 * size, (used, size)  # the headers' blocks only


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_layout_builds_its_model(layouts, name):
    blocks = find_moe_blocks(build_on_meta(load_config(str(layouts[name]))))
    n_layers, n_experts, top_k, groups = EXPECTED[name][:4]
    assert len(blocks) == n_layers
    assert {(b.num_experts, b.top_k) for b in blocks} == {(n_experts, top_k)}
    assert max(blocks[0].spec.n_group, 1) == groups


def test_deepseek_r1_layout_details(layouts):
    """fp8 weights with float32 128x128 scale grids (partial edge blocks), the MTP layer 61 with its
    own embedding and head, float32 selection biases."""
    ckpt = Checkpoint.open(layouts["deepseek-r1"])
    kv = ckpt.info("model.layers.5.self_attn.kv_a_proj_with_mqa.weight")
    assert (kv.dtype, kv.shape) == ("F8_E4M3", (576, 7168))
    scale = ckpt.info("model.layers.5.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
    assert (scale.dtype, scale.shape) == ("F32", (5, 56))
    assert ckpt.info("model.layers.60.mlp.experts.255.down_proj.weight_scale_inv").shape == (56, 16)
    assert ckpt.info("model.layers.3.mlp.gate.e_score_correction_bias").dtype == "F32"
    assert ckpt.info("model.layers.61.shared_head.head.weight").shape == (129280, 7168)
    assert "model.layers.61.mlp.experts.255.up_proj.weight" in ckpt
    assert "model.layers.2.mlp.experts.0.up_proj.weight" not in ckpt  # layers 0-2 are dense


def test_gpt_oss_layout_details(layouts):
    ckpt = Checkpoint.open(layouts["gpt-oss-120b"])
    blocks = ckpt.info("model.layers.0.mlp.experts.gate_up_proj_blocks")
    assert (blocks.dtype, blocks.shape) == ("U8", (128, 5760, 90, 16))
    assert ckpt.info("model.layers.0.mlp.experts.down_proj_scales").shape == (128, 2880, 90)
    assert ckpt.info("model.layers.35.self_attn.sinks").shape == (64,)


def test_headers_only_copy_keeps_every_header(tmp_path):
    from moeprune.testing.quantized import quantized_tiny

    src = quantized_tiny("qwen3_moe", tmp_path / "q", "fp8", block_size=(16, 16))
    copy = headers_only_copy(src, tmp_path / "copy")
    a, b = Checkpoint.open(src), Checkpoint.open(copy)
    assert [(t.key, t.dtype, t.shape, t.start, t.end, t.file.name) for t in a.tensors.values()] == [
        (t.key, t.dtype, t.shape, t.start, t.end, t.file.name) for t in b.tensors.values()
    ]
    assert (copy / "config.json").read_text() == (src / "config.json").read_text()
    zeros = Path(b.shard_files[0]).read_bytes()[-64:]
    assert zeros == bytes(64)
