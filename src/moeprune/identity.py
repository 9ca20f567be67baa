"""Which model a profile, plan or library was made on: beyond the config, a digest of the weights.

The config fingerprint (:func:`moeprune.profile.model_fingerprint`) says whether a file fits the
model's expert layout; two checkpoints of the same shape (another fine-tune, another seed) share
it. The *router digest* tells them apart without loading the model: a sha256 over, for every MoE
layer in order, its decoder index, the router weight's shape and its values rounded to bfloat16
and written as float32. The values, not the file bytes, so that the digest is the same for the
checkpoint on disk (read through the safetensors header's byte ranges, in the hub layout with
one key per expert or the fused one) and for the model in memory (loaded in float32 or
bfloat16, the two dtypes moeprune loads in).

Files written before the digest existed carry none; they are accepted on the config fingerprint
alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:  # torch where router weights are read: KEY is read by the torch-free rewrite
    import torch

KEY = "router_sha256"  # the metadata key in profiles, plans and libraries


def router_digest(weights: Iterable[tuple[int, torch.Tensor]]) -> str:
    """sha256 of (layer, router weight) pairs in the canonical form described above."""
    import torch

    h = hashlib.sha256(b"moeprune-router/1")
    for layer, w in weights:
        t = w.detach().to("cpu").float().to(torch.bfloat16).float().contiguous()
        h.update(f"|{int(layer)}:{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    """:func:`checkpoint_router_digest` for an opened checkpoint and its expert-key map."""
    weights = []
    for b in keymap.blocks:
        keys = [
            k.key for k in keymap.of_block(b.index) if k.kind == "router" and k.target == b.router_weight_path
        ]
        if len(keys) != 1:
            return None
        weights.append((b.layer, ckpt.tensor(keys[0])))
    return router_digest(weights) if weights else None


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
