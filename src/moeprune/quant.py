"""Quantized checkpoints as published: which formats moeprune reads, and what one tensor means.

Two storage formats cover the MoE checkpoints people download quantized:

- **fp8, block-wise** (DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8, Qwen3-*-FP8, MiniMax-M2):
  ``quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], ...}``. A linear
  weight ``X.weight`` is stored as ``float8_e4m3fn`` [out, in] beside ``X.weight_scale_inv``
  [ceil(out/b0), ceil(in/b1)] (float32; bf16 in some releases; ``scale_fmt: ue8m0`` scales are
  powers of two, stored as float32 (DeepSeek-V3.1) or as uint8 exponent bytes). Its value is ``float(w) * s`` over each b0 x b1 block; edge blocks are
  partial (DeepSeek's ``weight_dequant``). A fused layout (what transformers saves from its
  ``FP8Experts``) stores ``experts.gate_up_proj`` [E, 2I, H] with ``experts.gate_up_proj_scale_inv``
  [E, ceil(2I/b0), ceil(H/b1)]. ``modules_to_not_convert`` lists what stays unquantized (the
  router, norms, embeddings, LM head).
- **mxfp4** (gpt-oss): ``experts.gate_up_proj_blocks`` uint8 [E, R, G, 16] (two e2m1 values per
  byte, low nibble first) with ``experts.gate_up_proj_scales`` uint8 [E, R, G] (e8m0 exponents,
  bias 127): the rows hold G x 32 values, and the model's tensor is the transpose, [E, G*32, R].

Other quantization methods (compressed-tensors int4/w4a16 packs, GPTQ, AWQ, bitsandbytes, NVFP4,
...) are refused with one line by :func:`quant_format`.

Everything here works on single tensors (any leading dimensions, e.g. the expert axis); the code
that decides *which* tensors to read lives with its callers (offload, surgery, adaptive).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # torch only to dequantize: the rewrite reads the format without it (arch/spec.py)
    import torch

__all__ = [
    "COMPANION_SUFFIXES",
    "QuantFormat",
    "companion_of",
    "dequantize_fp8",
    "dequantize_mxfp4",
    "dequantize_tensors",
    "is_companion",
    "quant_format",
    "quantized_keys",
]

SUPPORTED = ("fp8", "mxfp4")

# suffixes of the tensors that travel with a quantized weight (never a model tensor by themselves)
FP8_SCALE = "_scale_inv"  # X.weight -> X.weight_scale_inv; experts.gate_up_proj -> ..._scale_inv
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
COMPANION_SUFFIXES = (FP8_SCALE, MXFP4_SCALES, MXFP4_BLOCKS, ".input_scale", ".activation_scale")

_WHY = {
    "compressed-tensors": "compressed-tensors packs (int4/w4a16, w8a8, nvfp4) are not supported",
    "gptq": "GPTQ int4 packs are not supported",
    "awq": "AWQ int4 packs are not supported",
    "bitsandbytes": "bitsandbytes quantizes on load; prune the unquantized model instead",
    "modelopt": "NVIDIA ModelOpt (nvfp4/fp8 per-tensor) checkpoints are not supported",
}


@dataclass(frozen=True)
class QuantFormat:
    """The quantization of a checkpoint, read from its ``quantization_config``."""

    method: str  # "fp8" | "mxfp4"
    block_size: tuple[int, int] | None = None  # fp8: rows x cols of one scale block
    scale_fmt: str = "float"  # fp8: "float" or "ue8m0" (power-of-two scales)
    modules_to_not_convert: tuple[str, ...] = field(default_factory=tuple)
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        if self.method == "fp8" and self.block_size:
            return f"fp8 (e4m3, {self.block_size[0]}x{self.block_size[1]} blocks)"
        return self.method


def _as_dict(quant: Any) -> dict[str, Any]:
    if isinstance(quant, Mapping):
        return dict(quant)
    if hasattr(quant, "to_dict"):
        return dict(quant.to_dict())
    return dict(vars(quant))


def quant_format(config: Any) -> QuantFormat | None:
    """The checkpoint's quantization (None when it stores plain floats); a method moeprune cannot
    read is a :class:`UserError` naming it."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    q = _as_dict(quant)
    method = str(q.get("quant_method") or "").lower() or "unknown"
    if method not in SUPPORTED:
        why = _WHY.get(method, f"quantization method '{method}' is not supported")
        raise UserError(
            f"quantized checkpoint: {why} (moeprune reads fp8 block-wise and mxfp4 checkpoints)",
            "use the model's bf16 or fp8 release, or dequantize it first",
        )
    if method == "fp8":
        block = q.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
                raise UserError(
                    f"quantization_config.weight_block_size must be two positive integers, got {block!r}",
                    "fix config.json",
                )
            block = (int(block[0]), int(block[1]))
        fmt = str(q.get("scale_fmt") or "float")
        skip = tuple(q.get("modules_to_not_convert") or ())
        return QuantFormat("fp8", block, fmt, skip, q)
    skip = tuple(q.get("modules_to_not_convert") or ())
    return QuantFormat("mxfp4", None, "ue8m0", skip, q)


# --- companions -------------------------------------------------------------------------------


def is_companion(key: str) -> bool:
    """True for a tensor that only qualifies a quantized weight (scales, packed fp4 blocks)."""
    return key.endswith(COMPANION_SUFFIXES)


def companion_of(key: str) -> str | None:
    """The model tensor a companion belongs to: ``X.weight_scale_inv`` -> ``X.weight``,
    ``experts.down_proj_scale_inv`` -> ``experts.down_proj``, ``experts.down_proj_blocks`` /
    ``_scales`` -> ``experts.down_proj``; None for any other key."""
    for suffix in (FP8_SCALE, MXFP4_BLOCKS, MXFP4_SCALES):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def quantized_keys(keys: list[str] | set[str], fmt: QuantFormat) -> dict[str, tuple[str, ...]]:
    """``{model tensor: (checkpoint keys that store it)}`` for every quantized tensor in ``keys``:
    fp8 ``(weight, weight_scale_inv)``; mxfp4 ``(name_blocks, name_scales)``."""
    present = set(keys)
    out: dict[str, tuple[str, ...]] = {}
    if fmt.method == "fp8":
        for key in present:
            if key.endswith(FP8_SCALE) and key[: -len(FP8_SCALE)] in present:
                out[key[: -len(FP8_SCALE)]] = (key[: -len(FP8_SCALE)], key)
    else:
        for key in present:
            if key.endswith(MXFP4_BLOCKS):
                name = key[: -len(MXFP4_BLOCKS)]
                if name + MXFP4_SCALES in present:
                    out[name] = (key, name + MXFP4_SCALES)
    return out


def check_quantized(keys: list[str] | set[str], fmt: QuantFormat, where: Any) -> None:
    """A checkpoint whose config says it is quantized holds quantized tensors (a dequantized copy
    that kept the config's ``quantization_config`` is mislabelled, and would be read wrongly)."""
    if not quantized_keys(keys, fmt):
        what = "weight_scale_inv" if fmt.method == "fp8" else "_blocks/_scales"
        raise UserError(
            f"'{where}': config.json says {fmt.method} but the checkpoint holds no quantized tensor "
            f"(no {what} keys)",
            "remove quantization_config from config.json if the weights are not quantized",
        )


# --- dequantization ---------------------------------------------------------------------------


def _scale_values(scale: torch.Tensor, scale_fmt: str = "float") -> torch.Tensor:
    """Scales as float32 multipliers. Exponent bytes (uint8, ``float8_e8m0fnu``) are powers of two,
    bias 127; a floating-point scale is a multiplier whatever ``scale_fmt`` says (DeepSeek-V3.1
    declares ``ue8m0`` and stores its power-of-two scales as float32)."""
    import torch

    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if e8m0 is not None and scale.dtype == e8m0:
        scale = scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float32) - 127)
    return scale.to(torch.float32)


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] | None,
    dtype: torch.dtype | None = None,
    scale_fmt: str = "float",
) -> torch.Tensor:
    """``weight`` [..., R, C] (float8) times its per-block ``scale_inv`` [..., ceil(R/b0),
    ceil(C/b1)] (one scalar per tensor when ``block_size`` is None), in ``dtype``. Computed in
    float32 and rounded once, as DeepSeek's reference and transformers' dequantizer do (``dtype``
    None: float32)."""
    import torch

    dtype = dtype or torch.float32
    if weight.element_size() != 1:  # stored unquantized (a module in modules_to_not_convert)
        return weight.to(dtype)
    w = weight.to(torch.float32)
    s = _scale_values(scale_inv, scale_fmt)
    rows, cols = w.shape[-2:]
    if block_size is None or s.numel() == 1 or s.dim() < 2:
        return (w * s.reshape(-1)[0] if s.numel() == 1 else w * s).to(dtype)
    b0, b1 = block_size
    want = (math.ceil(rows / b0), math.ceil(cols / b1))
    if tuple(s.shape[-2:]) != want:
        # a grid that is no ceil-division of the weight by the configured block (e.g. the fused
        # gate_up scale of transformers' FP8Experts, padded to 2 rows): derive the block from it
        b0, b1 = math.ceil(rows / s.shape[-2]), math.ceil(cols / s.shape[-1])
        if (math.ceil(rows / b0), math.ceil(cols / b1)) != tuple(s.shape[-2:]):
            raise ValueError(f"fp8 scale grid {tuple(s.shape)} does not fit weight {tuple(w.shape)}")
    nb0, nb1 = s.shape[-2:]
    lead = w.shape[:-2]
    if rows != nb0 * b0 or cols != nb1 * b1:  # partial edge blocks: pad, scale, cut
        w = torch.nn.functional.pad(w, (0, nb1 * b1 - cols, 0, nb0 * b0 - rows))
    out = w.view(*lead, nb0, b0, nb1, b1) * s.reshape(*lead, nb0, 1, nb1, 1)
    out = out.view(*lead, nb0 * b0, nb1 * b1)
    if out.shape[-2:] != (rows, cols):
        out = out[..., :rows, :cols]
    return out.to(dtype)


_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """mxfp4 ``blocks`` [..., G, 16] uint8 with e8m0 ``scales`` [..., G] -> [..., G*32] in ``dtype``
    (the rows as stored: gpt-oss's model tensor is the transpose of the last two axes; ``dtype``
    None: float32)."""
    import torch

    dtype = dtype or torch.float32
    if tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"mxfp4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.view(torch.uint8) if blocks.dtype != torch.uint8 else blocks
    lo = lut[(b & 0x0F).long()]
    hi = lut[(b >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32]
    exp = (
        scales.view(torch.uint8).to(torch.int32) - 127
        if scales.dtype != torch.uint8
        else scales.to(torch.int32) - 127
    )
    out = torch.ldexp(vals, exp.unsqueeze(-1))
    return out.flatten(-2).to(dtype)


def dequantize_tensors(
    tensors: Mapping[str, torch.Tensor], fmt: QuantFormat, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors ``tensors`` with every quantized weight replaced by its float value
    under the key the unquantized checkpoint uses (companions dropped; mxfp4 transposed into the
    model's layout). Floating tensors stored unquantized are returned as they are."""
    import torch

    pairs = quantized_keys(list(tensors), fmt)
    used = {k for ks in pairs.values() for k in ks}
    out: dict[str, torch.Tensor] = {}
    for name, (a, b) in pairs.items():
        if fmt.method == "fp8":
            out[name] = dequantize_fp8(tensors[a], tensors[b], fmt.block_size, dtype, fmt.scale_fmt)
        else:
            out[name] = dequantize_mxfp4(tensors[a], tensors[b], dtype).transpose(-1, -2).contiguous()
    for key, value in tensors.items():
        if key in used:
            continue
        if is_companion(key):
            if key.endswith((".input_scale", ".activation_scale")):
                continue  # static activation scales: the dequantized model computes in full precision
            raise UserError(
                f"quantized checkpoint: '{key}' has no weight to scale",
                "the checkpoint is incomplete; download it again",
            )
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise UserError(
                f"quantized checkpoint: fp8 tensor '{key}' has no '{key}{FP8_SCALE}'",
                "the checkpoint is incomplete; download it again",
            )
        out[key] = value
    return out


def expert_tensor(module: torch.nn.Module, name: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert ``expert``'s slice of the fused tensor ``name`` of an experts module, dequantized when
    the module holds it quantized (transformers' ``FP8Experts``: ``name`` in fp8 beside
    ``name_scale_inv``; a module loaded by moeprune with quantized experts: see
    :mod:`moeprune.offload`)."""
    import torch

    source = module.__dict__.get("_moeprune_quantized")
    if source is not None:
        return source.expert(name, expert, dtype)
    weight = getattr(module, name)[expert]
    if weight.element_size() == 1 and weight.dtype != torch.uint8:
        scale = getattr(module, name + FP8_SCALE, None)
        if scale is not None:
            block = getattr(module, "block_size", None)
            return dequantize_fp8(weight, scale[expert], tuple(block) if block else None, dtype)
    return weight
