"""Which model a profile, plan or library was made on: beyond the config, a digest of the weights.

The config fingerprint (:func:`model_fingerprint`) says whether a file fits the
model's expert layout; two checkpoints of the same shape (another fine-tune, another seed) share
it. The *router digest* tells them apart without loading the model: a sha256 over, for every MoE
layer in order, its decoder index, the router weight's shape and its values rounded to bfloat16
and written as float32. The values, not the file bytes, so that the digest is the same for the
checkpoint on disk (read through the safetensors header's byte ranges, in the hub layout with
one key per expert or the fused one) and for the model in memory (loaded in float32 or
bfloat16, the two dtypes moeprune loads in).

Files written before the digest existed carry none; they are accepted on the config fingerprint
alone.

The digest of a checkpoint is computed from the stored bytes without torch where that is exact
(:func:`stored_canonical_bytes`: BF16, F16, F32 and F64 holding only zeros and normal finite
numbers), so that a plain removal rewrite imports no torch; anything else is read through torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # torch where router weights are read: KEY is read by the torch-free rewrite
    import torch

KEY = "router_sha256"  # the metadata key in profiles, plans and libraries


# --- the config fingerprint -----------------------------------------------------------------------


def fingerprint_fields(config: Any, blocks: Sequence[Any] | None = None) -> dict[str, Any]:
    """The config facts that fix the expert layout (MoE layers found by structure, on the meta
    device when no ``blocks`` are given)."""
    if blocks is None:
        from .arch import find_moe_blocks
        from .modelio import build_on_meta

        blocks = find_moe_blocks(build_on_meta(config))
    text = config.get_text_config()
    return {
        "model_type": str(getattr(config, "model_type", None) or getattr(text, "model_type", "?")),
        "hidden_size": int(text.hidden_size),
        "num_hidden_layers": int(text.num_hidden_layers),
        "num_experts": int(blocks[0].num_experts),
        "top_k": int(blocks[0].top_k),
        "moe_layers": [int(b.layer) for b in blocks],
    }


def model_fingerprint(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- the router digest ------------------------------------------------------------------------------


def router_digest(weights: Iterable[tuple[int, torch.Tensor]]) -> str:
    """sha256 of (layer, router weight) pairs in the canonical form described above."""
    return _digest((layer, list(w.shape), canonical_bytes(w)) for layer, w in weights)


def _digest(parts: Iterable[tuple[int, list[int], bytes]]) -> str:
    h = hashlib.sha256(b"moeprune-router/1")
    for layer, shape, data in parts:
        h.update(f"|{int(layer)}:{[int(d) for d in shape]}|".encode())
        h.update(data)
    return h.hexdigest()


def canonical_bytes(w: torch.Tensor) -> bytes:
    """The values of ``w`` rounded to bfloat16 and written as float32 (native byte order), by torch."""
    import torch

    t = w.detach().to("cpu").float().to(torch.bfloat16).float().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


# stored dtype -> its numpy dtype (safetensors stores little-endian); BF16 is read as its bits
_NUMPY_DTYPES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4", "F64": "<f8"}


def stored_canonical_bytes(dtype: str, data: bytes) -> bytes | None:
    """:func:`canonical_bytes` of a tensor stored as ``dtype`` with the bytes ``data``, computed
    without torch, or None where only torch can say (another dtype; an infinity, a NaN, or a
    float32 subnormal before or after the rounding, whose handling is the CPU's and torch's
    business: NaN payloads, a bfloat16 conversion that flushes subnormals). An F16 subnormal is a
    normal float32 (the conversion is exact), so it is computed here.

    Bit-exact with torch: F16 and F64 become float32 as torch's ``.float()`` does (F16 exactly, F64
    rounded to nearest, ties to even, by the same IEEE conversion), and a float32 becomes bfloat16
    by c10's ``round_to_nearest_even`` (add ``0x7FFF`` plus the lowest kept bit, keep the top 16
    bits); a BF16 tensor is its bits shifted up by 16 (float32 -> bfloat16 -> float32 is exact)."""
    if dtype == "BF16" and sys.byteorder == "little":
        return _bf16_canonical(data)
    import numpy as np

    kind = _NUMPY_DTYPES.get(dtype)
    if kind is None:
        return None
    if dtype == "BF16":
        bits = np.frombuffer(data, dtype=kind).astype(np.uint32) << 16
    else:
        values = np.frombuffer(data, dtype=kind)
        if dtype == "F64" and bool(((values != 0) & (np.abs(values) < np.finfo(np.float32).tiny)).any()):
            return None  # below float32's normal range: flushed or not, the CPU's business
        with np.errstate(over="ignore"):  # an F64 beyond float32's range becomes inf: refused below
            f32 = values.astype(np.float32)
        u = f32.view(np.uint32)
        if not _plain(u):
            return None
        bits = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16) << 16
    if not _plain(bits):
        return None
    return bits.astype(np.uint32).tobytes()  # native order, as torch's bytes


# per high byte of a little-endian bfloat16: 1 where its exponent may be all zeros or all ones
# (the high byte holds the sign and the exponent's top 7 bits; the low byte's top bit is the last)
_BF16_EDGE = bytes(int((b & 0x7F) in (0, 0x7F)) for b in range(256))


def _bf16_canonical(data: bytes) -> bytes | None:
    """:func:`stored_canonical_bytes` of little-endian BF16 bytes, without numpy (its import is
    most of what a router digest would add to a plain rewrite): each value's two bytes become the
    top half of a float32, two zero bytes below them. Only values whose high byte allows a zero or
    all-ones exponent (zeros, the tiniest and the huge ones: few in a router) are looked at one by one."""
    lo, hi = data[0::2], data[1::2]
    edge = hi.translate(_BF16_EDGE)
    i = edge.find(1)
    while i != -1:
        exponent = ((hi[i] & 0x7F) << 1) | (lo[i] >> 7)
        if exponent == 0xFF or (exponent == 0 and lo[i] & 0x7F):  # inf/NaN, or subnormal
            return None
        i = edge.find(1, i + 1)
    out = bytearray(2 * len(data))
    out[2::4] = lo
    out[3::4] = hi
    return bytes(out)


def _plain(bits: Any) -> bool:
    """Every float32 in ``bits`` (their uint32 patterns) is zero or a normal finite number."""
    exponent = bits & 0x7F800000
    return not bool(((exponent == 0x7F800000) | ((exponent == 0) & ((bits & 0x007FFFFF) != 0))).any())


def model_router_digest(model: torch.nn.Module, blocks: Sequence[Any]) -> str | None:
    """The digest of a model in memory (None when a router weight is not materialised)."""
    weights = []
    for b in blocks:
        if not b.router_weight_path:
            return None
        try:
            w = model.get_parameter(b.router_weight_path)
        except AttributeError:
            return None
        if w.is_meta:
            return None
        weights.append((b.layer, w))
    return router_digest(weights) if weights else None


def checkpoint_router_digest(model_dir: str | os.PathLike, config: Any | None = None) -> str | None:
    """The digest of a safetensors checkpoint, reading only its router tensors (None when a router
    weight cannot be told apart in its keys)."""
    from .arch import find_moe_blocks
    from .arch.keys import map_expert_keys
    from .checkpoint import Checkpoint
    from .modelio import build_on_meta, load_config

    ckpt = Checkpoint.open(model_dir)
    meta_model = build_on_meta(config if config is not None else load_config(str(model_dir)))
    blocks = find_moe_blocks(meta_model)
    keymap = map_expert_keys(meta_model, blocks, ckpt.shapes())
    return keymap_router_digest(ckpt, keymap)


def keymap_router_digest(ckpt: Any, keymap: Any) -> str | None:
    """:func:`checkpoint_router_digest` for an opened checkpoint and its expert-key map: from the
    stored bytes where :func:`stored_canonical_bytes` can, else through torch."""
    routers = []
    for b in keymap.blocks:
        keys = [
            k.key for k in keymap.of_block(b.index) if k.kind == "router" and k.target == b.router_weight_path
        ]
        if len(keys) != 1:
            return None
        routers.append((b.layer, keys[0]))
    if not routers:
        return None
    return _digest((layer, *_stored_part(ckpt, key)) for layer, key in routers)


def _stored_part(ckpt: Any, key: str) -> tuple[list[int], bytes]:
    """(shape, canonical bytes) of the checkpoint tensor ``key``."""
    info = ckpt.info(key)
    if info.dtype in _NUMPY_DTYPES:
        with open(info.file, "rb") as fh:
            fh.seek(info.start)
            data = fh.read(info.nbytes)
        if len(data) == info.nbytes:  # a short read (a truncated file) is left to safetensors' error
            got = stored_canonical_bytes(info.dtype, data)
            if got is not None:
                return list(info.shape), got
    w = ckpt.tensor(key)
    return list(w.shape), canonical_bytes(w)


def differs(a: Any, b: Any) -> bool:
    """True when both digests are known and differ (an unknown one is accepted)."""
    return bool(a) and bool(b) and a != b


def check_router(expected: Any, actual: str | None, what: str, fix: str) -> None:
    """Refuse when ``what`` (a file made on a model with digest ``expected``) meets a model whose
    router weights differ."""
    if differs(expected, actual):
        raise UserError(
            f"{what} was made on a model of the same shape with other router weights "
            f"(router digest {str(expected)[:12]}, this model {str(actual)[:12]}): another checkpoint",
            fix,
        )
