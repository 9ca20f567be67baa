"""Full-size checkpoints made of headers only: DeepSeek-R1, Qwen3-235B-A22B and gpt-oss-120b.

:func:`write_layout` writes, for one published model, its ``config.json``, its
``model.safetensors.index.json`` and every shard as a valid safetensors header followed by a
hole: the file is ``os.truncate``-d to its full size, so it is sparse and takes almost no disk
(reading its tensor data gives zeros). Everything moeprune decides from headers alone (the dry run
of ``prune`` and ``profile``, key mapping, the rewrite's plan) runs on these exactly as on the
real download.

Each layout has the published key names, dtypes and shapes (fp8 e4m3 weights with float32
``weight_scale_inv`` per 128x128 block for DeepSeek-R1, including its multi-token-prediction layer
61; bfloat16 for Qwen3-235B-A22B; mxfp4 ``_blocks``/``_scales`` experts for gpt-oss-120b), the
published shard count and shard file names. What they reproduce, checked by
``tests/test_layouts.py`` against :data:`PUBLISHED`: the number of tensors, the parameter count per
dtype (as the Hugging Face API lists it) and hence the tensor bytes (the index's ``total_size``),
and the number of shards. What they do not reproduce: which tensors each published shard holds
(the shards here are cut in key order into the published number of about equal parts), so the
per-shard sizes, and the header bytes (the sum of the file sizes differs from the download's by
what the headers differ; :data:`PUBLISHED` records both figures).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LAYOUTS",
    "PUBLISHED",
    "Published",
    "headers_only_copy",
    "layout_tensors",
    "write_headers_only",
    "write_layout",
]

INDEX_NAME = "model.safetensors.index.json"
Tensor = tuple[str, str, tuple[int, ...]]  # key, safetensors dtype, shape


@dataclass(frozen=True)
class Published:
    """Figures the release publishes (and where they were read), to check a layout against."""

    repo: str
    shards: int
    tensors: int | None  # keys in the index's weight_map (None: not found published)
    params: dict[str, int]  # parameters per safetensors dtype (Hugging Face API "safetensors")
    tensor_bytes: int  # sum of tensor data bytes (the index's total_size)
    file_bytes: int | None  # sum of the shard files' sizes (headers included), if published
    source: str


PUBLISHED: dict[str, Published] = {
    "deepseek-r1": Published(
        repo="deepseek-ai/DeepSeek-R1",
        shards=163,
        tensors=None,
        params={"BF16": 3_918_786_560, "F8_E4M3": 680_571_043_840, "F32": 41_555_600},
        # 2 x BF16 + 1 x F8_E4M3 + 4 x F32 parameters
        tensor_bytes=688_574_839_360,
        file_bytes=688_586_727_753,
        source="HF API safetensors.parameters (DeepSeek-R1 and DeepSeek-V3 list the same); the 163 "
        "weight files sum to 688,586,727,753 bytes at revision 56d4cbbb",
    ),
    "qwen3-235b-a22b": Published(
        repo="Qwen/Qwen3-235B-A22B",
        shards=118,
        tensors=36_945,
        params={"BF16": 235_093_634_560},
        tensor_bytes=470_187_269_120,
        file_bytes=None,
        source="index metadata.total_size 470,187,269,120 with 36,945 weight_map keys",
    ),
    "gpt-oss-120b": Published(
        repo="openai/gpt-oss-120b",
        shards=15,
        tensors=None,
        params={"BF16": 2_167_371_072, "U8": 60_914_073_600},
        tensor_bytes=65_248_815_744,
        file_bytes=65_248_893_184,
        source="15 shards model-00000..00014-of-00014; tensor bytes 65,248,815,744, files "
        "65,248,893,184 bytes; HF API BF16 parameters 2,167,371,072",
    ),
}


# --- configs, as published (fields transformers reads) -------------------------------------------

_R1_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

_QWEN3_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 94,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 1536,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 94,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_GPT_OSS_CONFIG: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "num_local_experts": 128,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}


# --- tensors ------------------------------------------------------------------------------------


def _fp8(key: str, rows: int, cols: int, block: int = 128) -> Iterator[Tensor]:
    """A block-wise fp8 linear weight and its float32 scale grid (edge blocks partial)."""
    yield f"{key}.weight", "F8_E4M3", (rows, cols)
    yield f"{key}.weight_scale_inv", "F32", (math.ceil(rows / block), math.ceil(cols / block))


def _deepseek_r1(c: dict[str, Any]) -> Iterator[Tensor]:
    h, vocab = c["hidden_size"], c["vocab_size"]
    heads, nope, rope, v = (
        c["num_attention_heads"],
        c["qk_nope_head_dim"],
        c["qk_rope_head_dim"],
        c["v_head_dim"],
    )
    q_rank, kv_rank = c["q_lora_rank"], c["kv_lora_rank"]
    n_exp, moe_i, dense_i = c["n_routed_experts"], c["moe_intermediate_size"], c["intermediate_size"]
    shared_i = moe_i * c["n_shared_experts"]

    def mlp(prefix: str, inter: int) -> Iterator[Tensor]:
        yield from _fp8(f"{prefix}.gate_proj", inter, h)
        yield from _fp8(f"{prefix}.up_proj", inter, h)
        yield from _fp8(f"{prefix}.down_proj", h, inter)

    def layer(i: int) -> Iterator[Tensor]:
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", "BF16", (h,)
        yield f"{p}.post_attention_layernorm.weight", "BF16", (h,)
        a = f"{p}.self_attn"
        yield from _fp8(f"{a}.q_a_proj", q_rank, h)
        yield f"{a}.q_a_layernorm.weight", "BF16", (q_rank,)
        yield from _fp8(f"{a}.q_b_proj", heads * (nope + rope), q_rank)
        yield from _fp8(f"{a}.kv_a_proj_with_mqa", kv_rank + rope, h)
        yield f"{a}.kv_a_layernorm.weight", "BF16", (kv_rank,)
        yield from _fp8(f"{a}.kv_b_proj", heads * (nope + v), kv_rank)
        yield from _fp8(f"{a}.o_proj", h, heads * v)
        if i < c["first_k_dense_replace"]:
            yield from mlp(f"{p}.mlp", dense_i)
            return
        yield f"{p}.mlp.gate.weight", "BF16", (n_exp, h)
        yield f"{p}.mlp.gate.e_score_correction_bias", "F32", (n_exp,)
        for e in range(n_exp):
            yield from mlp(f"{p}.mlp.experts.{e}", moe_i)
        yield from mlp(f"{p}.mlp.shared_experts", shared_i)

    yield "model.embed_tokens.weight", "BF16", (vocab, h)
    n = c["num_hidden_layers"]
    for i in range(n):
        yield from layer(i)
    yield "model.norm.weight", "BF16", (h,)
    yield "lm_head.weight", "BF16", (vocab, h)
    for i in range(n, n + c["num_nextn_predict_layers"]):  # the MTP layer: its own embedding and head
        yield from layer(i)
        p = f"model.layers.{i}"
        yield f"{p}.embed_tokens.weight", "BF16", (vocab, h)
        yield f"{p}.enorm.weight", "BF16", (h,)
        yield f"{p}.hnorm.weight", "BF16", (h,)
        yield f"{p}.eh_proj.weight", "BF16", (h, 2 * h)
        yield f"{p}.shared_head.norm.weight", "BF16", (h,)
        yield f"{p}.shared_head.head.weight", "BF16", (vocab, h)


def _qwen3_moe(c: dict[str, Any]) -> Iterator[Tensor]:
    h, vocab, d = c["hidden_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    n_exp, inter = c["num_experts"], c["moe_intermediate_size"]
    yield "model.embed_tokens.weight", "BF16", (vocab, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", "BF16", (h,)
        yield f"{p}.post_attention_layernorm.weight", "BF16", (h,)
        yield f"{p}.self_attn.q_proj.weight", "BF16", (q, h)
        yield f"{p}.self_attn.k_proj.weight", "BF16", (kv, h)
        yield f"{p}.self_attn.v_proj.weight", "BF16", (kv, h)
        yield f"{p}.self_attn.o_proj.weight", "BF16", (h, q)
        yield f"{p}.self_attn.q_norm.weight", "BF16", (d,)
        yield f"{p}.self_attn.k_norm.weight", "BF16", (d,)
        yield f"{p}.mlp.gate.weight", "BF16", (n_exp, h)
        for e in range(n_exp):
            x = f"{p}.mlp.experts.{e}"
            yield f"{x}.gate_proj.weight", "BF16", (inter, h)
            yield f"{x}.up_proj.weight", "BF16", (inter, h)
            yield f"{x}.down_proj.weight", "BF16", (h, inter)
    yield "model.norm.weight", "BF16", (h,)
    yield "lm_head.weight", "BF16", (vocab, h)


def _gpt_oss(c: dict[str, Any]) -> Iterator[Tensor]:
    h, vocab, d = c["hidden_size"], c["vocab_size"], c["head_dim"]
    heads, q, kv = c["num_attention_heads"], c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    n_exp, inter = c["num_local_experts"], c["intermediate_size"]
    yield "model.embed_tokens.weight", "BF16", (vocab, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", "BF16", (h,)
        yield f"{p}.post_attention_layernorm.weight", "BF16", (h,)
        a = f"{p}.self_attn"
        for name, rows, cols in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)):
            yield f"{a}.{name}.weight", "BF16", (rows, cols)
            yield f"{a}.{name}.bias", "BF16", (rows,)
        yield f"{a}.sinks", "BF16", (heads,)
        yield f"{p}.mlp.router.weight", "BF16", (n_exp, h)
        yield f"{p}.mlp.router.bias", "BF16", (n_exp,)
        x = f"{p}.mlp.experts"
        # mxfp4: the rows of the model's transposed tensor, 32 values per block, 16 bytes per block
        for name, rows, cols in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            yield f"{x}.{name}_blocks", "U8", (n_exp, rows, cols // 32, 16)
            yield f"{x}.{name}_scales", "U8", (n_exp, rows, cols // 32)
            yield f"{x}.{name}_bias", "BF16", (n_exp, rows)
    yield "model.norm.weight", "BF16", (h,)
    yield "lm_head.weight", "BF16", (vocab, h)


@dataclass(frozen=True)
class _Layout:
    config: dict[str, Any]
    tensors: Any  # config -> Iterator[Tensor]
    shard_name: str  # format of one shard's file name: {i} (numbered as published), {n}


LAYOUTS: dict[str, _Layout] = {
    "deepseek-r1": _Layout(_R1_CONFIG, _deepseek_r1, "model-{i:05d}-of-{n:06d}.safetensors"),
    "qwen3-235b-a22b": _Layout(_QWEN3_CONFIG, _qwen3_moe, "model-{i:05d}-of-{n:05d}.safetensors"),
    # gpt-oss numbers its shards from 0: model-00000-of-00014 ... model-00014-of-00014
    "gpt-oss-120b": _Layout(_GPT_OSS_CONFIG, _gpt_oss, "model-{i0:05d}-of-{last:05d}.safetensors"),
}

_SIZES = {"F8_E4M3": 1, "U8": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _SIZES[dtype]


def layout_tensors(name: str) -> list[Tensor]:
    """Every tensor of the published layout ``name`` (key, dtype, shape), in key order."""
    layout = _get(name)
    return list(layout.tensors(layout.config))


def _get(name: str) -> _Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _split(tensors: list[Tensor], n: int) -> list[list[Tensor]]:
    """``tensors`` cut in order into exactly ``n`` groups of about equal bytes (the greedy cut at the
    smallest shard limit that gives ``n`` groups)."""
    sizes = [_nbytes(d, s) for _, d, s in tensors]
    if n > len(tensors):
        raise ValueError(f"cannot cut {len(tensors)} tensors into {n} shards")

    def cut(limit: int) -> list[list[Tensor]]:
        groups: list[list[Tensor]] = [[]]
        total = 0
        for t, size in zip(tensors, sizes, strict=True):
            if groups[-1] and total + size > limit:
                groups.append([])
                total = 0
            groups[-1].append(t)
            total += size
        return groups

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:  # the smallest limit that gives at most n groups
        mid = (lo + hi) // 2
        if len(cut(mid)) <= n:
            hi = mid
        else:
            lo = mid + 1
    groups = cut(lo)
    while len(groups) < n:  # fewer tensors than bytes would suggest: split the largest group
        big = max(range(len(groups)), key=lambda g: len(groups[g]))
        half = len(groups[big]) // 2
        groups[big : big + 1] = [groups[big][:half], groups[big][half:]]
    return groups


def write_headers_only(
    tensors: list[Tensor],
    out_dir: str | os.PathLike,
    shard_names: list[str],
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``tensors`` as len(shard_names) safetensors shards whose data are holes, with
    ``model.safetensors.index.json``; returns the shard paths."""
    from ..checkpoint import OutTensor, ZeroPiece, safetensors_header

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _split(sorted(tensors, key=lambda t: _natural(t[0])), len(shard_names))
    weight_map: dict[str, str] = {}
    paths = []
    total = 0
    for name, group in zip(shard_names, groups, strict=True):
        # widest dtypes first, as safetensors writes them, so every tensor starts aligned
        ordered = sorted(group, key=lambda t: -_SIZES[t[1]])
        items = [OutTensor(k, d, s, [ZeroPiece(_nbytes(d, s))]) for k, d, s in ordered]
        header = safetensors_header(items, metadata if metadata is not None else {"format": "pt"})
        data = sum(t.nbytes for t in items)
        path = out / name
        with open(path, "wb") as fh:
            fh.write(header)
        os.truncate(path, len(header) + data)  # the tensor data: a hole (sparse, no disk used)
        paths.append(path)
        total += data
        weight_map.update(dict.fromkeys((k for k, _, _ in group), name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


def write_layout(name: str, out_dir: str | os.PathLike) -> Path:
    """Write the full-size layout ``name`` (a key of :data:`LAYOUTS`) into ``out_dir``: config.json,
    the shard index and every shard as a header followed by a hole. Returns ``out_dir``."""
    layout = _get(name)
    n = PUBLISHED[name].shards
    names = [layout.shard_name.format(i=i + 1, n=n, i0=i, last=n - 1) for i in range(n)]
    out = Path(out_dir)
    write_headers_only(layout_tensors(name), out, names)
    (out / "config.json").write_text(json.dumps(layout.config, indent=2) + "\n", encoding="utf-8")
    return out


def headers_only_copy(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A copy of the checkpoint in ``src_dir`` whose shards keep their headers byte for byte and
    whose tensor data are holes, with the same config, index and other small files: what a dry run
    sees is unchanged, and none of the data is there to be read."""
    import shutil
    import struct

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if not path.is_file():
            continue
        if path.suffix != ".safetensors":
            shutil.copyfile(path, out / path.name)
            continue
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(n)
        with open(out / path.name, "wb") as fh:
            fh.write(struct.pack("<Q", n) + header)
        os.truncate(out / path.name, path.stat().st_size)
    return out
