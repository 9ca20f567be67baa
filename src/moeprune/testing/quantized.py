"""Tiny quantized checkpoints in the layouts models are published in, and their dequantized twins.

The writers take a float model (e.g. ``moeprune.testing.tiny.tiny_model("deepseek_v3")``),
quantize it, and write a checkpoint with the key names, dtypes, scale shapes, ``config.json``
fields and shard index of the published releases:

- :func:`write_fp8`, ``layout="per-expert"`` (the hub layout of DeepSeek-V3/R1, Kimi-K2,
  GLM-4.5-FP8, Qwen3-*-FP8, MiniMax-M2): every linear weight ``X.weight`` as ``float8_e4m3fn``
  beside ``X.weight_scale_inv`` [ceil(out/b0), ceil(in/b1)] (float32; bfloat16 in the Qwen3 FP8
  releases), experts one key each (``mlp.experts.{e}.gate_proj.weight``; MiniMax
  ``block_sparse_moe.experts.{e}.w1.weight``); attention, dense MLPs and shared experts quantized
  too; routers, selection biases, norms, embeddings and the LM head stored unquantized in the
  dtype each release uses (:data:`FP8_STYLES`).
- :func:`write_fp8`, ``layout="fused"``: what transformers 5 saves from its ``FP8Experts``:
  ``experts.gate_up_proj`` [E, 2I, H] fp8 with ``experts.gate_up_proj_scale_inv``
  [E, ceil(2I/b0), ceil(H/b1)], ``experts.down_proj`` [E, H, I] likewise.
- :func:`write_mxfp4` (gpt-oss): ``experts.gate_up_proj_blocks`` uint8 [E, 2I, H/32, 16] and
  ``experts.gate_up_proj_scales`` uint8 [E, 2I, H/32] (the rows of the model's transposed tensor,
  32 e2m1 values per block, two per byte low nibble first, one e8m0 exponent per block), the same
  for ``down_proj``; expert biases, routers and attention in bfloat16.

Every checkpoint is sharded (``model-0000i-of-0000n.safetensors``) with a
``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), as released.
The block size is a parameter: the tests use small blocks (e.g. 16) so that edge blocks are
partial (DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows, 4.5 blocks of 128).

:func:`random_fp8` and :func:`random_mxfp4` write random checkpoints in the same layouts at any
width (DeepSeek-V3's, gpt-oss-120b's), streamed tensor by tensor without building the model: the
real-width benchmark (``benchmarks/bench_quantized.py``) uses them.

:func:`dequantized_twin` writes the same model unquantized, its weights exactly the dequantized
values (:func:`moeprune.quant.dequantize_tensors`): the reference a quantized path is compared with.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

__all__ = [
    "FP8_MAX",
    "FP8_STYLES",
    "Fp8Style",
    "LAYOUTS",
    "MXFP4_MODULES_TO_NOT_CONVERT",
    "dequantized_twin",
    "partial_blocks",
    "quantize_fp8",
    "quantize_mxfp4",
    "quantized_tiny",
    "random_fp8",
    "random_mxfp4",
    "read_tensors",
    "write_fp8",
    "write_mxfp4",
    "write_sharded",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SHARD_BYTES = 64 * 1024  # tiny fixtures still come in several shards, as the releases do
INDEX_NAME = "model.safetensors.index.json"


# --- quantizers ---------------------------------------------------------------------------------


def quantize_fp8(
    weight: torch.Tensor,
    block_size: tuple[int, int],
    scale_dtype: torch.dtype = torch.float32,
    scale_fmt: str = "float",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [..., R, C] as ``float8_e4m3fn`` and its ``weight_scale_inv`` [..., ceil(R/b0),
    ceil(C/b1)] in ``scale_dtype``: each block's largest magnitude maps to 448; edge blocks are
    partial. ``scale_fmt="ue8m0"`` rounds every scale up to a power of two (DeepSeek-V3.1)."""
    b0, b1 = block_size
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape[-2:]
    nr, nc = math.ceil(rows / b0), math.ceil(cols / b1)
    padded = torch.zeros(*w.shape[:-2], nr * b0, nc * b1)
    padded[..., :rows, :cols] = w
    amax = padded.unflatten(-1, (nc, b1)).unflatten(-3, (nr, b0)).abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    scale = scale.to(scale_dtype)  # quantize with the stored scale, so dequantizing inverts it
    full = (
        scale.to(torch.float32).repeat_interleave(b0, -2)[..., :rows, :].repeat_interleave(b1, -1)[..., :cols]
    )
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` [..., C] (C a multiple of 32) as mxfp4: ``blocks`` uint8 [..., C/32, 16] (two e2m1
    values per byte, low nibble first) and ``scales`` uint8 [..., C/32] (e8m0, bias 127): each
    block of 32 is divided by the power of two that brings its largest magnitude into [-6, 6],
    then rounded to the nearest e2m1 value."""
    x = rows.detach().to(torch.float32)
    if x.shape[-1] % 32:
        raise ValueError(f"mxfp4 rows of {x.shape[-1]} values are not a multiple of 32")
    x = x.unflatten(-1, (x.shape[-1] // 32, 32))
    amax = x.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127.0))
    exp = exp.clamp(-127, 127)
    v = torch.ldexp(x, -exp.to(torch.int32).unsqueeze(-1))
    idx = (v.abs().unsqueeze(-1) - _E2M1).abs().argmin(dim=-1)
    nibble = (idx + 8 * ((v < 0) & (idx > 0))).to(torch.uint8)
    blocks = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


# --- styles of the releases -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fp8Style:
    """How one family of fp8 releases stores what it does not quantize, and its config."""

    name: str
    fmt: str  # the release's quantization_config.fmt
    scale_dtype: torch.dtype
    float32: tuple[str, ...]  # unquantized tensors stored as float32 (key regexes); the rest bf16
    skip: Callable[[list[str]], list[str] | None]  # modules_to_not_convert from the hub keys


def _qwen_skip(keys: list[str]) -> list[str]:
    """Qwen3-*-FP8: the LM head, the embeddings, every norm and every router, by module name."""
    modules = {k.rpartition(".")[0] for k in keys}
    keep = [m for m in modules if m in ("lm_head", "model.embed_tokens", "model.norm")]
    keep += [m for m in modules if re.search(r"(layernorm|_norm|\.mlp\.gate)$", m)]
    return sorted(keep, key=_natural)


FP8_STYLES: dict[str, Fp8Style] = {
    # DeepSeek-V3/R1 (and Kimi-K2, GLM-4.5-FP8): float32 scales, float32 selection bias, the rest bf16
    "deepseek": Fp8Style(
        "deepseek", "e4m3", torch.float32, (r"e_score_correction_bias$",), lambda keys: None
    ),
    # Qwen3-*-FP8: bf16 scales, modules_to_not_convert lists the head, embeddings, norms, routers
    "qwen": Fp8Style("qwen", "e4m3", torch.bfloat16, (), _qwen_skip),
    # MiniMax-M2: float32 router rows and selection bias
    "minimax": Fp8Style(
        "minimax",
        "float8_e4m3fn",
        torch.float32,
        (r"\.gate\.weight$", r"e_score_correction_bias$"),
        lambda keys: ["gate", "e_score_correction_bias", "lm_head"],
    ),
}
_STYLE_OF = {"qwen3_moe": "qwen", "qwen2_moe": "qwen", "qwen3_next": "qwen", "minimax_m2": "minimax"}

# gpt-oss's quantization_config, as published
MXFP4_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]

# modules every release keeps unquantized: embeddings, the LM head and the routers
_NEVER_FP8 = re.compile(r"(^|\.)(embed_tokens|lm_head|gate|router)\.weight$")


# --- reading and writing shards ------------------------------------------------------------------


def _natural(key: str) -> list[Any]:
    """Sort key that puts layer 10 after layer 9 (the order releases store tensors in)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def write_sharded(
    tensors: Mapping[str, torch.Tensor], out_dir: str | Path, shard_bytes: int = SHARD_BYTES
) -> list[str]:
    """Write ``tensors`` in natural key order as ``model-0000i-of-0000n.safetensors`` shards of
    about ``shard_bytes`` each, with ``model.safetensors.index.json``; returns the shard names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    keys = sorted(tensors, key=_natural)
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    n = len(groups)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        save_file({k: tensors[k].contiguous() for k in group}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def _saved(model: Any, per_expert: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """The model's checkpoint tensors as transformers names them (hub per-expert keys or the fused
    layout), its config.json, and its other files (generation config)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_original_format=per_expert)
        tensors = read_tensors(tmp)
        config = json.loads((Path(tmp) / "config.json").read_text(encoding="utf-8"))
        others = {
            p.name: p.read_text(encoding="utf-8")
            for p in Path(tmp).iterdir()
            if p.suffix == ".json" and p.name not in ("config.json", INDEX_NAME)
        }
    return tensors, config, others


def _finish(
    out: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    others: dict[str, str],
    shard_bytes: int,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_sharded(tensors, out, shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name, text in others.items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def _set_dtype(config: dict[str, Any], dtype: str) -> None:
    """The config's dtype field (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    for name in ("dtype", "torch_dtype"):
        if name in config or name == "dtype":
            config[name] = dtype
    for sub in config.values():
        if isinstance(sub, dict) and ("dtype" in sub or "torch_dtype" in sub):
            _set_dtype(sub, dtype)


# --- the writers ----------------------------------------------------------------------------------


def _is_fused_expert(key: str, tensor: torch.Tensor) -> bool:
    """A fused expert tensor ([E, out, in], named without ``.weight``) of a transformers experts module."""
    return tensor.dim() == 3 and ".experts." in key and not key.endswith((".weight", "_bias", ".bias"))


def write_fp8(
    model: Any,
    out_dir: str | Path,
    *,
    layout: str = "per-expert",
    block_size: tuple[int, int] = (128, 128),
    style: str | None = None,
    scale_dtype: torch.dtype | None = None,
    scale_fmt: str = "float",
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write ``model`` as a block-wise fp8 checkpoint in ``out_dir``.

    ``layout``: ``"per-expert"`` (the hub layout, one key per expert) or ``"fused"`` (transformers'
    ``FP8Experts``). ``style``: ``"deepseek"``, ``"qwen"`` or ``"minimax"`` (:data:`FP8_STYLES`;
    default from the model type); ``scale_dtype`` overrides the style's; ``scale_fmt="ue8m0"``
    writes power-of-two scales and says so in the config (DeepSeek-V3.1)."""
    if layout not in ("per-expert", "fused"):
        raise ValueError(f"layout must be 'per-expert' or 'fused', not {layout!r}")
    mtype = str(model.config.model_type)
    st = FP8_STYLES[style or _STYLE_OF.get(mtype, "deepseek")]
    sdtype = scale_dtype or st.scale_dtype
    block = (int(block_size[0]), int(block_size[1]))
    tensors, config, others = _saved(model, per_expert=layout == "per-expert")
    if layout == "per-expert" and not any(re.search(r"\.experts\.\d+\.", k) for k in tensors):
        raise ValueError(f"transformers saves '{mtype}' experts fused: it has no per-expert hub layout")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        fused = _is_fused_expert(key, t)
        if fused or (key.endswith(".weight") and t.dim() == 2 and not _NEVER_FP8.search(key)):
            if fused and key.endswith("gate_up_proj") and math.ceil(t.shape[-2] / block[0]) < 2:
                # FP8Experts keeps at least two scale rows for gate_up (one per half)
                raise ValueError(f"block {block} is taller than the fused gate_up_proj of {t.shape[-2]} rows")
            q, s = quantize_fp8(t, block, sdtype, scale_fmt)
            out[key] = q
            out[
                (key[: -len(".weight")] + ".weight_scale_inv")
                if key.endswith(".weight")
                else key + "_scale_inv"
            ] = s
        elif t.is_floating_point():
            keep32 = any(re.search(p, key) for p in st.float32)
            out[key] = t.to(torch.float32 if keep32 else torch.bfloat16)
        else:
            out[key] = t
    quant: dict[str, Any] = {
        "activation_scheme": "dynamic",
        "fmt": st.fmt,
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    skip = st.skip(sorted(tensors))
    if skip is not None:
        quant["modules_to_not_convert"] = skip
    if scale_fmt != "float":
        quant["scale_fmt"] = scale_fmt
    config["quantization_config"] = quant
    _set_dtype(config, "bfloat16")
    return _finish(Path(out_dir), out, config, others, shard_bytes)


def write_mxfp4(model: Any, out_dir: str | Path, *, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``model`` (gpt-oss) as an mxfp4 checkpoint in ``out_dir``, in gpt-oss's layout: the
    fused experts as ``_blocks``/``_scales`` of their transposed rows, everything else bfloat16."""
    tensors, config, others = _saved(model, per_expert=False)
    out: dict[str, torch.Tensor] = {}
    found = False
    for key, t in tensors.items():
        if _is_fused_expert(key, t):
            blocks, scales = quantize_mxfp4(t.transpose(-1, -2))  # stored as [E, out, in/32, 16]
            out[key + "_blocks"], out[key + "_scales"] = blocks, scales
            found = True
        elif t.is_floating_point():
            out[key] = t.to(torch.bfloat16)
        else:
            out[key] = t
    if not found:
        raise ValueError(f"'{config.get('model_type')}' has no fused expert tensors to store as mxfp4")
    config["quantization_config"] = {
        "modules_to_not_convert": list(MXFP4_MODULES_TO_NOT_CONVERT),
        "quant_method": "mxfp4",
    }
    _set_dtype(config, "bfloat16")
    return _finish(Path(out_dir), out, config, others, shard_bytes)


# The published layouts the tests cover: name -> (tiny model type, format, writer arguments)
LAYOUTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deepseek-fp8": ("deepseek_v3", "fp8", {"layout": "per-expert"}),  # DeepSeek-V3/R1, Kimi-K2
    "qwen3-fp8": ("qwen3_moe", "fp8", {"layout": "per-expert"}),  # Qwen3-*-FP8
    "minimax-fp8": ("minimax_m2", "fp8", {"layout": "per-expert"}),  # MiniMax-M2 (w1/w2/w3)
    "deepseek-fp8-fused": ("deepseek_v3", "fp8", {"layout": "fused"}),  # transformers' FP8Experts
    "gpt-oss-mxfp4": ("gpt_oss", "mxfp4", {}),  # gpt-oss
}


def quantized_tiny(
    model_type: str,
    out_dir: str | Path,
    fmt: str = "fp8",
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Path:
    """``tiny_model(model_type, **model_kwargs)`` written by :func:`write_fp8` (``fmt="fp8"``,
    ``kwargs`` passed on) or :func:`write_mxfp4` (``fmt="mxfp4"``)."""
    from .tiny import tiny_model

    model = tiny_model(model_type, **dict(model_kwargs or {}))
    if fmt == "fp8":
        return write_fp8(model, out_dir, **kwargs)
    if fmt == "mxfp4":
        return write_mxfp4(model, out_dir, **kwargs)
    raise ValueError(f"fmt must be 'fp8' or 'mxfp4', not {fmt!r}")


# --- the dequantized twin -------------------------------------------------------------------------


def dequantized_twin(
    src_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write the quantized checkpoint ``src_dir`` unquantized in ``out_dir``: every quantized
    weight replaced by its value (:func:`moeprune.quant.dequantize_tensors`, under the key the
    unquantized checkpoint uses), every other floating tensor cast to ``dtype``, the config without
    ``quantization_config`` (anything else, e.g. moeprune's own layout record, is kept)."""
    from ..quant import dequantize_tensors, quant_format

    src, out = Path(src_dir), Path(out_dir)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    fmt = quant_format(SimpleNamespace(quantization_config=config.get("quantization_config")))
    tensors = read_tensors(src)
    values = dequantize_tensors(tensors, fmt, dtype) if fmt is not None else dict(tensors)
    values = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in values.items()}
    config.pop("quantization_config", None)
    _set_dtype(config, str(dtype).removeprefix("torch."))
    out.mkdir(parents=True, exist_ok=True)
    write_sharded(values, out, shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for p in src.iterdir():
        if p.is_file() and p.name not in ("config.json", INDEX_NAME) and p.suffix != ".safetensors":
            shutil.copyfile(p, out / p.name)
    return out


def partial_blocks(directory: str | Path) -> list[str]:
    """The fp8 weights of a checkpoint whose last row or column block is partial (empty for mxfp4
    and for unquantized checkpoints): where dequantizers that derive the block from the scale grid
    go wrong."""
    from ..checkpoint import Checkpoint

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size")
    if quant.get("quant_method") != "fp8" or not block:
        return []
    found = []
    for key, info in Checkpoint.open(directory).tensors.items():
        rows, cols = info.shape[-2:] if len(info.shape) >= 2 else (0, 0)
        if info.dtype == "F8_E4M3" and (rows % block[0] or cols % block[1]):
            found.append(key)
    return sorted(found, key=_natural)


# --- random checkpoints at real width, streamed ---------------------------------------------------
#
# A DeepSeek-V3 MoE layer is 11.3 GB of fp8: a benchmark at real width cannot build the model or
# hold the checkpoint. These writers take the key names and shapes from the model built on the
# meta device (and transformers' own reverse conversion to the hub layout), decide each tensor's
# stored dtype with the same rules as write_fp8 / write_mxfp4, and stream every tensor's bytes
# from a small pool of random values to the shard files, one tensor at a time.

# pool lengths prime (in elements), so that consecutive tensors cut from a running cursor start
# at different phases of the pool: no two experts or router rows come out identical
_POOL_ELEMENTS = 16_777_259

_DTYPE_SIZE = {"F8_E4M3": 1, "U8": 1, "BF16": 2, "F32": 4}


def _hub_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """``{checkpoint key: shape}`` of the model of ``config`` as transformers saves it in the hub
    layout (per-expert keys where the model type has them), computed on the meta device."""
    from transformers.core_model_loading import revert_weight_conversion

    from ..modelio import build_on_meta

    meta = build_on_meta(config)
    hub = revert_weight_conversion(meta, meta.state_dict())
    return {k: tuple(int(d) for d in t.shape) for k, t in hub.items()}


def _pools(seed: int, names: set[str]) -> dict[str, memoryview]:
    """Random byte pools for the kinds of stored value in ``names`` (all finite, at plausible
    magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    n = _POOL_ELEMENTS
    make = {
        # fp8 values of a unit-ish normal (largest finite e4m3 is 448: never NaN), times scales
        # around 0.01: weights of std ~0.02, which keep activations finite through the layers
        "fp8": lambda: (torch.randn(n, generator=g) * 2).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
        "scale_f32": lambda: torch.rand(n, generator=g) * 0.01 + 0.005,
        "scale_bf16": lambda: (torch.rand(n, generator=g) * 0.01 + 0.005).to(torch.bfloat16),
        "bf16": lambda: (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16),
        "f32": lambda: torch.randn(n, generator=g) * 0.02,
        "norm": lambda: (1 + torch.randn(n, generator=g) * 0.02).to(torch.bfloat16),
        # mxfp4: every nibble is a finite e2m1 value; exponents 2^-8..2^-6 give weights of std ~0.02
        "fp4": lambda: torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
        "e8m0": lambda: torch.randint(119, 122, (n,), generator=g, dtype=torch.uint8),
    }
    return {name: memoryview(make[name]().view(torch.uint8).numpy().tobytes()) for name in sorted(names)}


@dataclass(frozen=True)
class _Entry:
    key: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    pool: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_SIZE[self.dtype]


def _stream_shards(out: Path, entries: list[_Entry], shard_bytes: int, seed: int) -> int:
    """Write ``entries`` in natural key order as ``model-0000i-of-0000n.safetensors`` shards of at
    most about ``shard_bytes`` each (a tensor is never split), with the shard index; every
    tensor's bytes are cut from its pool at a running cursor. Returns the bytes of tensor data."""
    entries = sorted(entries, key=lambda e: _natural(e.key))
    groups: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    pools = _pools(seed, {e.pool for e in entries})
    cursor = dict.fromkeys(pools, 0)
    n = len(groups)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in group:
            header[e.key] = {
                "dtype": e.dtype,
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
            weight_map[e.key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / name, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            for e in group:
                pool, left = pools[e.pool], e.nbytes
                while left:
                    start = cursor[e.pool]
                    chunk = min(left, len(pool) - start)
                    fh.write(pool[start : start + chunk])
                    left -= chunk
                    cursor[e.pool] = (start + chunk) % len(pool)
                # the next tensor starts on an element boundary of every dtype
                cursor[e.pool] -= cursor[e.pool] % 4
    total = sum(e.nbytes for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def _write_config(config: Any, out: Path, quant: dict[str, Any]) -> None:
    config.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    saved["quantization_config"] = quant
    _set_dtype(saved, "bfloat16")
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")


def random_fp8(
    config: Any,
    out_dir: str | Path,
    *,
    block_size: tuple[int, int] = (128, 128),
    style: str | None = None,
    shard_bytes: int = 4 * 1024**3,
    seed: int = 0,
) -> int:
    """Write a random block-wise fp8 checkpoint of the model of ``config`` in ``out_dir``, in the
    hub per-expert layout and with the key names, dtypes, scale shapes, ``quantization_config``
    and shard index :func:`write_fp8` gives (``style`` as there), streamed tensor by tensor
    without building the model: a DeepSeek-V3-width checkpoint costs its disk space only.
    Returns the bytes of tensor data."""
    st = FP8_STYLES[style or _STYLE_OF.get(str(config.model_type), "deepseek")]
    b0, b1 = int(block_size[0]), int(block_size[1])
    scale_dtype, scale_pool = (
        ("BF16", "scale_bf16") if st.scale_dtype == torch.bfloat16 else ("F32", "scale_f32")
    )
    shapes = _hub_shapes(config)
    if not any(re.search(r"\.experts\.\d+\.", k) for k in shapes):
        raise ValueError(
            f"transformers saves '{config.model_type}' experts fused: it has no per-expert hub layout"
        )
    entries = []
    for key, shape in shapes.items():
        if key.endswith(".weight") and len(shape) == 2 and not _NEVER_FP8.search(key):
            scale = (math.ceil(shape[0] / b0), math.ceil(shape[1] / b1))
            entries.append(_Entry(key, "F8_E4M3", shape, "fp8"))
            entries.append(
                _Entry(key[: -len(".weight")] + ".weight_scale_inv", scale_dtype, scale, scale_pool)
            )
        elif any(re.search(p, key) for p in st.float32):
            entries.append(_Entry(key, "F32", shape, "f32"))
        else:
            entries.append(_Entry(key, "BF16", shape, "norm" if key.endswith("norm.weight") else "bf16"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quant: dict[str, Any] = {
        "activation_scheme": "dynamic",
        "fmt": st.fmt,
        "quant_method": "fp8",
        "weight_block_size": [b0, b1],
    }
    skip = st.skip(sorted(shapes))
    if skip is not None:
        quant["modules_to_not_convert"] = skip
    _write_config(config, out, quant)
    return _stream_shards(out, entries, shard_bytes, seed)


def random_mxfp4(config: Any, out_dir: str | Path, *, shard_bytes: int = 4 * 1024**3, seed: int = 0) -> int:
    """Write a random mxfp4 checkpoint of the gpt-oss model of ``config`` in ``out_dir`` in
    gpt-oss's layout (the layout :func:`write_mxfp4` gives: fused experts as ``_blocks`` /
    ``_scales`` of their transposed rows, everything else bfloat16), streamed tensor by tensor
    without building the model. Returns the bytes of tensor data."""
    entries = []
    for key, shape in _hub_shapes(config).items():
        if len(shape) == 3 and ".experts." in key and not key.endswith((".weight", "_bias", ".bias")):
            e, cols, rows = shape  # stored as the rows of the model's transposed tensor
            if cols % 32:
                raise ValueError(f"mxfp4 rows of {cols} values are not a multiple of 32")
            entries.append(_Entry(key + "_blocks", "U8", (e, rows, cols // 32, 16), "fp4"))
            entries.append(_Entry(key + "_scales", "U8", (e, rows, cols // 32), "e8m0"))
        else:
            entries.append(_Entry(key, "BF16", shape, "norm" if key.endswith("norm.weight") else "bf16"))
    if not any(e.pool == "fp4" for e in entries):
        raise ValueError(f"'{config.model_type}' has no fused expert tensors to store as mxfp4")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quant = {"modules_to_not_convert": list(MXFP4_MODULES_TO_NOT_CONVERT), "quant_method": "mxfp4"}
    _write_config(config, out, quant)
    return _stream_shards(out, entries, shard_bytes, seed)
