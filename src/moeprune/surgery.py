"""Surgery: rewrite a safetensors checkpoint keeping only some routed experts.

Modes (``shared/methods.md``, "Pruning modes"; ``docs/surgery.md``):

- **remove**: the pruned model's logits equal those of the original model whose router logits for
  removed experts are set to -inf before selection. Slicing every tensor that carries the expert
  axis (router rows, selection biases, fused or per-expert weights, expert biases) and lowering the
  expert count in ``config.json`` does exactly that, because the kept experts stay in ascending
  original order: routing picks top-k among them and renormalises as the architecture does, and
  group-limited routers keep their groups when every group keeps the same number of experts.
  A plan with different counts per layer (``--scope global``) gives a *ragged* checkpoint: the
  config holds the largest count and ``config.moeprune.experts_per_layer`` every layer's own, and
  :func:`moeprune.load` builds it. ``pad_uniform`` instead pads each short layer with dead experts
  (zero weights and router row, selection bias ~-1e4, never selected) so stock transformers loads
  it; only routers with an additive selection bias have such an exactly dead expert.
- **novice** (MoNE): the router is unchanged and a replaced expert outputs its mean output ē_i
  (from the profile) times its gate. The checkpoint stores the kept experts' weights and the
  vectors (``experts.novice_outputs`` [R, H]); :func:`moeprune.load` builds it. With
  ``pad_uniform``, experts with biases (gpt-oss) store a novice as zero weights with ē_i as down
  bias: a stock checkpoint, exact because the gated activation of 0 is 0.

Quantized checkpoints (fp8 block-wise, mxfp4: :mod:`moeprune.quant`) are rewritten the same way,
never dequantized: a kept expert's stored bytes travel with their scales (per-expert keys
renumbered; fused weights, fp8 scale grids and mxfp4 blocks/scales sliced on the expert axis), and
``quantization_config`` is kept as it is.

The rewrite streams: it reads the shard headers, builds the output headers from them, and copies
only the kept byte ranges (:mod:`moeprune.checkpoint`), one output shard at a time; padding and
constant vectors are written from memory. It writes into a temporary folder beside the output and
renames it at the end; on any error or interrupt the temporary folder is removed and nothing is
left behind.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch.keys import ExpertKey, ExpertKeyMap
from .arch.pruned import (
    CONFIG_KEY,
    DOWN_BIAS,
    NOVICE_BUFFER,
    PrunedLayout,
    bias_novice_problem,
    dead_bias_value,
    pad_uniform_problem,
    padding_slots,
)
from .arch.spec import top_k_problem
from .arch.table import EXPERT_COUNT_ATTRS, NESTED_COUNT_CONFIGS, TOP_K_ATTRS
from .card import human_bytes as human_bytes  # re-exported: commands/prune.py imports it from here
from .card import model_card
from .checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    AnyPiece,
    Checkpoint,
    DataPiece,
    OutTensor,
    TensorInfo,
    ZeroPiece,
    parse_size,
    write_safetensors,
)
from .errors import UserError
from .model_files import SourceFiles, copy_source_files, inside, model_root
from .quant import quant_format
from .remote import mark_config, remote_code_problem, serve_spec, write_modeling_file

# torch is imported inside the functions that read or compute a tensor (novice vectors of a loaded
# profile, dead selection biases) or build a model: a rewrite planned from the headers copies byte
# ranges and imports no torch (novice vectors read from the file come as numpy arrays), which it
# would otherwise pay ~230 MB of peak RSS and seconds for (docs/benchmarks.md)
if TYPE_CHECKING:
    from .arch.blocks import MoEBlock

MODES = ("remove", "novice")

# Besides the names every config declares, these types have readers that use an alias: hub Qwen3-MoE
# configs and transformers < 5 read `num_experts`, transformers 5 writes `num_local_experts`.
_ALSO_WRITE: dict[str, tuple[str, ...]] = {"qwen3_moe": ("num_experts", "num_local_experts")}


@dataclass
class RewriteResult:
    out_dir: Path
    layers: list[int]
    num_experts: int
    kept_per_layer: int  # the largest number of experts a layer keeps
    top_k: int
    original_top_k: int
    shards: list[str]
    bytes_in: int
    bytes_out: int
    layout: str
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)  # "name (why)"
    source: SourceFiles = field(default_factory=SourceFiles)  # files taken from the source, remote code
    mode: str = "remove"
    kept_counts: dict[int, int] = field(default_factory=dict)  # layer -> experts kept
    padded: bool = False  # pad_uniform: short layers padded with dead experts / novices in biases
    stock: bool = True  # stock transformers loads it (else moeprune.load)
    quantization: str | None = None  # e.g. "fp8 (e4m3, 128x128 blocks)": kept experts copied as stored
    dropped_mtp: int = 0  # tensors of multi-token-prediction layers left out (DeepSeek-V3's layer 61)
    whole_layers: list[int] = field(default_factory=list)  # hash-routed MoE layers kept whole (DeepSeek-V4)
    # not stock: why plain transformers gets no loader (modeling_moeprune.py), None when it gets one
    remote_code_problem: str | None = None

    @property
    def ragged(self) -> bool:
        return len(set(self.kept_counts.values())) > 1


# --- checks -------------------------------------------------------------------------------------


def check_output_dir(src_dir: Path, out_dir: Path, force: bool) -> Path:
    """Refuse to write into the input, around it, or over a non-empty folder without ``force`` (and
    with it, over a folder moeprune did not write): :func:`moeprune.outputs.check_output`."""
    from .outputs import check_output

    return check_output(out_dir, inputs=[("input model", src_dir)], force=force)


def check_kept(
    blocks: list[MoEBlock], kept: dict[int, list[int]], top_k: int | None = None, mode: str = "remove"
) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Validate kept ids against the model's MoE blocks; returns (normalised kept, count per layer).

    Layers may keep different numbers of experts. In remove mode every layer must keep at least
    top-k experts and, with group-limited routing, the same number in every group (the novice mode
    keeps the router whole, so neither applies)."""
    layers = [b.layer for b in blocks]
    missing = [layer for layer in layers if layer not in kept]
    if missing:
        raise UserError(
            f"the plan has no kept experts for MoE layer(s) {', '.join(map(str, missing[:8]))}",
            "make the plan from a profile of this model",
        )
    extra = sorted(set(kept) - set(layers))
    if extra:
        raise UserError(
            f"the plan names layer(s) {', '.join(map(str, extra[:8]))}, which are not MoE layers of this model "
            f"(MoE layers: {layers})",
            "make the plan from a profile of this model",
        )
    out: dict[int, list[int]] = {}
    for b in blocks:
        ids = list(kept[b.layer])
        if len(set(ids)) != len(ids):
            raise UserError(f"the plan keeps an expert twice in layer {b.layer}", "make the plan again")
        bad = [i for i in ids if not 0 <= int(i) < b.num_experts]
        if bad:
            raise UserError(
                f"the plan keeps expert(s) {bad[:5]} in layer {b.layer}, outside 0..{b.num_experts - 1}",
                "make the plan from a profile of this model",
            )
        out[b.layer] = sorted(int(i) for i in ids)
    counts = {layer: len(ids) for layer, ids in out.items()}
    if top_k is not None:  # routers that cannot route another number of experts (PhiMoE: always 2)
        why = top_k_problem(blocks[0].spec, top_k)
        if why is not None:
            raise UserError(f"cannot lower top-k to {top_k}: {why}", "make the plan without --top-k")
    if mode == "novice":
        return out, counts
    for b in blocks:
        k = top_k if top_k is not None else b.top_k
        n_kept = counts[b.layer]
        if n_kept < k:
            raise UserError(
                f"the plan keeps {n_kept} experts in layer {b.layer}, fewer than the {k} active per token",
                "keep at least top-k experts, or lower top-k in the plan",
            )
        spec = b.spec
        if spec.n_group > 1:
            size = b.num_experts // spec.n_group
            per = [0] * spec.n_group
            for i in out[b.layer]:
                per[i // size] += 1
            if len(set(per)) != 1:
                raise UserError(
                    f"layer {b.layer} keeps {per} experts in its {spec.n_group} routing groups; the router "
                    "needs every group to keep the same number",
                    "make the plan with --per-group equal",
                )
            if spec.group_score == "top2_sum" and per[0] < 2:
                raise UserError(
                    f"layer {b.layer} keeps {per[0]} expert(s) per routing group; the router scores a group "
                    "by its top two experts",
                    "keep at least two experts per group",
                )
            if spec.group_limited and spec.topk_group * per[0] < k:
                raise UserError(
                    f"layer {b.layer}: {spec.topk_group} group(s) of {per[0]} kept experts cannot hold the "
                    f"{k} active experts",
                    "keep more experts per group",
                )
    return out, counts


def _model_type(config: Any) -> str:
    return str(getattr(config, "model_type", None) or getattr(config.get_text_config(), "model_type", "?"))


def check_mode(blocks: list[MoEBlock], meta_model: Any, mode: str, pad_uniform: bool, config: Any) -> None:
    """Refuse a mode the architecture cannot do exactly (before anything is written)."""
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'", f"use {' or '.join(MODES)}")
    mtype = _model_type(config)
    if mode == "novice" and blocks[0].spec.gate_site == "input":
        from .arch import llama4  # (torch: only where it is needed)

        raise UserError(
            f"cannot write a novice checkpoint of '{mtype}': {llama4.NOVICE_PROBLEM}",
            "prune with --mode remove (moeprune compare --novice still evaluates novices in memory)",
        )
    if mode == "novice" and blocks[0].expert_out_proj_path is not None:
        raise UserError(
            f"cannot write a novice checkpoint of '{mtype}': its experts run in a projected space "
            "(between pre_expert_proj and post_expert_proj), and a novice is a residual-stream vector",
            "prune with --mode remove",
        )
    if not pad_uniform:
        return
    if mode == "remove":
        why = pad_uniform_problem(blocks[0])
        if why is not None:
            raise UserError(
                f"--pad-uniform cannot pad '{mtype}' layers with dead experts: {why}",
                "drop --pad-uniform (the ragged checkpoint loads with moeprune.load), or plan with --scope layer",
            )
    else:
        if meta_model is None:  # blocks read from the headers: their family's answer (arch/header_keys.py)
            why = blocks[0].bias_novice_problem
        else:
            why = bias_novice_problem(blocks[0].experts(meta_model))
        if why is not None:
            raise UserError(
                f"--pad-uniform cannot store '{mtype}' novices in stock expert weights: {why}",
                "drop --pad-uniform: the novice checkpoint loads with moeprune.load",
            )


# --- config --------------------------------------------------------------------------------------


def _set_count(raw: dict[str, Any], cfg: Any, names: tuple[str, ...], old: int, new: int) -> None:
    """Set every name of a count that this config class reads or that the file already holds."""
    alias = dict(getattr(cfg, "attribute_map", None) or {})  # (the class's, or a HeaderConfig's)
    present = [n for n in names if n in raw]
    canonical = {alias.get(n, n) for n in names if getattr(cfg, n, None) == old and alias.get(n, n) in names}
    for n in present:
        raw[n] = new
    for n in canonical:
        raw[n] = new
    for n in _ALSO_WRITE.get(getattr(cfg, "model_type", ""), ()):
        if n in names:
            raw[n] = new


def pruned_config(
    raw: dict[str, Any],
    config: Any,
    old_e: int,
    new_e: int,
    top_k: int | None,
    layout: PrunedLayout | None = None,
) -> dict[str, Any]:
    """``config.json`` of the pruned model: every expert-count name (and top-k names if asked), and
    the per-layer layout as ``moeprune`` (read by :func:`moeprune.load`)."""
    out = copy.deepcopy(raw)
    text = config.get_text_config()
    targets = [(out, config)]
    if text is not config:
        for key, value in out.items():
            if isinstance(value, dict) and getattr(config, key, None) is text:
                targets = [(value, text)]
                break
        else:
            targets.append((out.setdefault("text_config", {}), text))
    for name in NESTED_COUNT_CONFIGS.get(_model_type(config), ()):  # DBRX: ffn_config
        targets.append((out.setdefault(name, {}), getattr(text, name)))
    for d, cfg in targets:
        _set_count(d, cfg, EXPERT_COUNT_ATTRS, old_e, new_e)
        if top_k is not None:
            old_k = next((getattr(cfg, n) for n in TOP_K_ATTRS if getattr(cfg, n, None) is not None), None)
            if old_k is not None and old_k != top_k:
                _set_count(d, cfg, TOP_K_ATTRS, old_k, top_k)
        d.pop(CONFIG_KEY, None)
    out.pop(CONFIG_KEY, None)
    if layout is not None:
        out[CONFIG_KEY] = layout.to_json()
        if len(set(layout.experts_per_layer.values())) > 1:
            # the load-balancing loss concatenates every layer's router logits, which ragged
            # widths cannot: written off so the checkpoint runs as written (docs/surgery.md)
            for d in [out] + [d for d, _ in targets]:
                if d.get("output_router_logits"):
                    d["output_router_logits"] = False
    return out


# --- the rewrite -----------------------------------------------------------------------------------


_WRITABLE_DTYPES = ("F32", "BF16", "F16", "F64")


def _as_array(values: Any) -> Any:
    """``values`` (a torch tensor or a numpy array) as a numpy float64 array: exactly, as every
    value of a float32, bfloat16 or float16 is a float64 too. Numpy, not torch: the novice vectors
    of the header path come as numpy arrays (:mod:`moeprune.profile_file`), and the rewrite then
    never imports torch."""
    import numpy as np

    if isinstance(values, np.ndarray):
        return np.asarray(values, dtype=np.float64)  # no copy when it is one already
    return values.detach().cpu().double().numpy()


def _entry_bytes(values: Any, dtype: str, what: str) -> bytes:
    """``values`` (a torch tensor or a numpy array) as the raw little-endian bytes of a safetensors
    ``dtype``, rounded to nearest even as torch's casts round (tests/test_surgery_modes.py)."""
    import numpy as np

    if dtype not in _WRITABLE_DTYPES:
        raise UserError(
            f"{what} is stored as {dtype}, which moeprune cannot write values into",
            "this checkpoint's dtype is not supported for this mode yet",
        )
    x = _as_array(values).reshape(-1)
    if dtype == "F64":
        return x.astype("<f8").tobytes()
    with np.errstate(over="ignore"):  # beyond the dtype's range: inf, as torch's cast gives
        if dtype == "F16":
            return x.astype("<f2").tobytes()
        f32 = x.astype(np.float32)
    if dtype == "F32":
        return f32.astype("<f4").tobytes()
    # BF16: the top half of the float32 bits, rounded to nearest even (c10's round_to_nearest_even)
    u = f32.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    bits[np.isnan(f32)] = 0x7FC0
    return bits.astype("<u2").tobytes()


@dataclass
class BlockRewrite:
    """How one MoE block's expert-axis tensors are rewritten.

    ``experts``: the output expert slots (a source expert id, or None for a generated entry);
    ``router``: the same for router rows and selection biases, or None to copy them whole
    (novice mode); ``constants``: slot -> constant vector (novice: the extra buffer, or the down
    bias of a zeroed expert); ``dead``: slots whose selection bias makes them never selected."""

    block: MoEBlock
    experts: list[int | None]
    router: list[int | None] | None
    constants: dict[int, Any] = field(default_factory=dict)  # numpy float64 rows
    novice_buffer: bool = False
    hidden: int = 0  # width of the constant vectors

    def positions(self) -> dict[int, int]:
        return {src: pos for pos, src in enumerate(self.experts) if src is not None}


def _generated_entry(
    ek: ExpertKey, info: TensorInfo, rw: BlockRewrite, slot: int, ckpt: Checkpoint, dead: dict[str, bytes]
) -> bytes | None:
    """The content of a generated expert-axis entry (None = zeros)."""
    b = rw.block
    if ek.kind == "router":
        if ek.target is not None and ek.target == b.selection_bias_path:
            if ek.key not in dead:
                axis = ek.axis or 0
                kept = [s for s in (rw.router or []) if s is not None]
                bias = ckpt.experts(ek.key, kept, axis=axis) if kept else None
                import torch

                value = torch.tensor([dead_bias_value(bias)])
                entry = info.entry_bytes(axis) // info.itemsize
                dead[ek.key] = _entry_bytes(value.expand(entry), info.dtype, f"selection bias '{ek.key}'")
            return dead[ek.key]
        return None
    if slot in rw.constants and ek.target == f"{b.experts_path}.{DOWN_BIAS}":
        return _entry_bytes(rw.constants[slot], info.dtype, f"expert bias '{ek.key}'")
    return None


def plan_tensors(
    ckpt: Checkpoint,
    keymap: ExpertKeyMap,
    rewrites: dict[int, list[int]] | dict[int, BlockRewrite],
    drop: set[str] | frozenset[str] = frozenset(),
) -> list[OutTensor]:
    """The output tensors in source order: expert tensors sliced, renumbered, padded or whole, the
    rest whole. ``rewrites`` maps a layer to its :class:`BlockRewrite` (or, for plain removal, to
    its sorted kept expert ids)."""
    plans: dict[int, BlockRewrite] = {}
    for b in keymap.blocks:
        rw = rewrites[b.layer]
        plans[b.layer] = rw if isinstance(rw, BlockRewrite) else BlockRewrite(b, list(rw), list(rw))
    tensors: list[OutTensor] = []
    dead: dict[str, bytes] = {}
    buffers_done: set[int] = set()
    positions = {layer: rw.positions() for layer, rw in plans.items()}
    for key, info in ckpt.tensors.items():
        if key in drop:
            continue
        ek = keymap.get(key)
        if ek is None:
            tensors.append(OutTensor(key, info.dtype, info.shape, info.whole()))
            continue
        rw = plans[ek.layer]
        if ek.kind != "router" and rw.novice_buffer and ek.layer not in buffers_done:
            buffers_done.add(ek.layer)
            tensors.append(_novice_buffer(ckpt, keymap, ek, rw))
        if ek.kind == "per_expert":
            pos = positions[ek.layer].get(ek.expert)  # type: ignore[arg-type]
            if pos is not None:
                tensors.append(OutTensor(ek.renumbered(pos), info.dtype, info.shape, info.whole()))
            if ek.expert == 0:  # every template holds expert 0: emit its generated slots once
                for slot, src in enumerate(rw.experts):
                    if src is None:
                        data = _generated_entry(ek, info, rw, slot, ckpt, dead)
                        piece = DataPiece(data) if data is not None else ZeroPiece(info.nbytes)
                        tensors.append(OutTensor(ek.renumbered(slot), info.dtype, info.shape, [piece]))
            continue
        slots_src = rw.router if ek.kind == "router" else rw.experts
        if slots_src is None:
            tensors.append(OutTensor(key, info.dtype, info.shape, info.whole()))
            continue
        axis = ek.axis or 0
        slots: list[int | bytes | None] = [
            src if src is not None else _generated_entry(ek, info, rw, pos, ckpt, dead)
            for pos, src in enumerate(slots_src)
        ]
        if ek.kind == "router":  # non-prunable router rows (Longcat zero / Inkling shared) stay, last
            slots += list(range(rw.block.num_experts, info.shape[axis] // ek.rows))
        shape = list(info.shape)
        shape[axis] = len(slots) * ek.rows
        tensors.append(OutTensor(key, info.dtype, tuple(shape), _by_expert(info, ek).slot_pieces(axis, slots)))
    names = [t.key for t in tensors]
    if len(set(names)) != len(names):
        raise AssertionError("renumbering produced duplicate keys")
    return tensors


def _by_expert(info: TensorInfo, ek: ExpertKey) -> TensorInfo:
    """``info`` with one entry per expert along the key's axis: DBRX's [E * I, H] tensors hold each
    expert as I consecutive rows, the same bytes as an [E, I, H] tensor."""
    if ek.rows == 1:
        return info
    axis = ek.axis or 0
    shape = (*info.shape[:axis], info.shape[axis] // ek.rows, ek.rows, *info.shape[axis + 1 :])
    return dataclasses.replace(info, shape=shape)


def _novice_buffer(ckpt: Checkpoint, keymap: ExpertKeyMap, ek: ExpertKey, rw: BlockRewrite) -> OutTensor:
    """``<experts>.novice_outputs`` [R, H], named like the block's experts keys in this checkpoint and
    stored in the dtype of its router weight (never quantised)."""
    b = rw.block
    prefix = ek.prefix.rstrip(".") if ek.kind == "per_expert" else ek.key.rpartition(".")[0]
    name = (ek.target or "")[len(b.experts_path) + 1 :]
    if ek.kind == "fused" and "." in name and ek.key.endswith("." + name):  # DBRX: experts.mlp.w1
        prefix = ek.key[: -len(name) - 1]
    leaf = b.experts_path.rpartition(".")[2]
    if ek.kind == "fused" and not prefix.endswith(leaf) and "." not in name:
        # the experts' keys are renamed on load (Ergo: feed_forward.up_proj -> mlp.experts.up_proj),
        # so a buffer named after them would land nowhere: use the model's own name
        prefix = b.experts_path
    dtype = "F32"
    for other in keymap.of_block(b.index):
        if other.target == b.router_weight_path and ckpt.info(other.key).dtype in _WRITABLE_DTYPES:
            dtype = ckpt.info(other.key).dtype
    vectors = [rw.constants[pos] for pos in sorted(rw.constants)]
    data = b"".join(_entry_bytes(v, dtype, "a novice vector") for v in vectors)
    pieces: list[AnyPiece] = [DataPiece(data)] if data else []
    return OutTensor(f"{prefix}.{NOVICE_BUFFER}", dtype, (len(vectors), rw.hidden), pieces)


def block_rewrites(
    blocks: list[MoEBlock],
    kept: dict[int, list[int]],
    mode: str,
    pad_uniform: bool,
    novices: dict[int, Any] | None,
) -> tuple[dict[int, BlockRewrite], PrunedLayout, int]:
    """Per-block rewrites, the config's layout record, and the config's expert count."""
    old_e = blocks[0].num_experts
    rewrites: dict[int, BlockRewrite] = {}
    if mode == "remove":
        total = max(len(v) for v in kept.values())
        for b in blocks:
            slots = padding_slots(b, kept[b.layer], total) if pad_uniform else list(kept[b.layer])
            rewrites[b.layer] = BlockRewrite(b, slots, slots)
        layout = PrunedLayout(
            mode="remove",
            experts_per_layer={layer: len(rw.experts) for layer, rw in rewrites.items()},
            dead_experts={
                layer: [p for p, s in enumerate(rw.experts) if s is None]
                for layer, rw in rewrites.items()
                if None in rw.experts
            },
            original_experts=old_e,
        )
        return rewrites, layout, total
    import numpy as np

    replaced = {b.layer: sorted(set(range(b.num_experts)) - set(kept[b.layer])) for b in blocks}
    for b in blocks:
        given = (novices or {}).get(b.layer)
        vectors = None if given is None else _as_array(given)
        if vectors is None or vectors.ndim != 2 or vectors.shape[0] != len(replaced[b.layer]):
            raise UserError(
                f"no novice vector for each of the {len(replaced[b.layer])} replaced experts of layer {b.layer}",
                "pass the profile the plan was made from",
            )
        finite = np.isfinite(vectors).all(axis=1)
        if not bool(finite.all()):  # a NaN novice would silently poison every token routed to it
            expert = replaced[b.layer][int(np.flatnonzero(~finite)[0])]
            raise UserError(
                f"the novice vector (mone_mean) of expert {expert} of layer {b.layer} is NaN or infinite",
                "re-create the profile with `moeprune profile`",
            )
        if pad_uniform:
            slots: list[int | None] = [i if i in set(kept[b.layer]) else None for i in range(b.num_experts)]
            consts = {i: vectors[j] for j, i in enumerate(replaced[b.layer])}
            rewrites[b.layer] = BlockRewrite(b, slots, None, consts, hidden=int(vectors.shape[1]))
        else:
            n = len(kept[b.layer])
            consts = {n + j: vectors[j] for j in range(len(replaced[b.layer]))}
            rewrites[b.layer] = BlockRewrite(
                b, list(kept[b.layer]), None, consts, novice_buffer=True, hidden=int(vectors.shape[1])
            )
    layout = PrunedLayout(
        mode="novice",
        experts_per_layer={layer: (old_e if pad_uniform else len(kept[layer])) for layer in kept},
        novice_experts=replaced,
        novice_storage="down_bias" if pad_uniform else "buffer",
        original_experts=old_e,
    )
    return rewrites, layout, old_e


def split_shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _aligned(shard: list[OutTensor]) -> list[OutTensor]:
    """Widest dtypes first (as safetensors orders them), so every tensor starts aligned."""
    from .checkpoint import DTYPE_SIZES

    return sorted(shard, key=lambda t: -DTYPE_SIZES.get(t.dtype, 1))


@dataclass
class RewritePlan:
    """Everything the rewrite will write, decided from the config and the shard headers alone
    (:func:`plan_rewrite`): the output shards' tensors and the byte ranges they are copied from,
    the new config, and the result to report. :mod:`moeprune.estimate` sizes a dry run from it."""

    ckpt: Checkpoint
    raw_config: dict[str, Any]
    new_config: dict[str, Any]
    layout: PrunedLayout
    kept: dict[int, list[int]]
    tensors: list[OutTensor]
    shards: list[list[OutTensor]]
    names: list[str]
    result: RewriteResult
    # planned from config.json and the headers (arch/header_keys.py), no model built: then also
    # the header config and blocks, and the expert count the written config gives every layer
    from_headers: bool = False
    config: Any = None
    blocks: list[Any] = field(default_factory=list)
    config_experts: int = 0

    @property
    def file_metadata(self) -> dict[str, str]:
        return self.ckpt.file_metadata or {"format": "pt"}

    def index_text(self) -> str:
        """``model.safetensors.index.json`` of a sharded output."""
        index_meta = dict(self.ckpt.index_metadata)
        index_meta["total_size"] = self.result.bytes_out
        if "total_parameters" in index_meta:
            index_meta["total_parameters"] = sum(t.numel for t in self.tensors)
        weight_map = {t.key: name for name, shard in zip(self.names, self.shards, strict=True) for t in shard}
        index = {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}
        return json.dumps(index, indent=2) + "\n"

    def shard_files(self) -> list[tuple[str, list[OutTensor]]]:
        """(file name, tensors in the order they are written) of every output shard."""
        return [(name, _aligned(shard)) for name, shard in zip(self.names, self.shards, strict=True)]


def plan_rewrite(
    src: Path,
    out: Path,
    kept: dict[int, list[int]],
    top_k: int | None = None,
    metadata: dict[str, Any] | None = None,
    *,
    plan: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    mode: str = "remove",
    pad_uniform: bool = False,
    novices: dict[int, Any] | None = None,
    allow_other_profile: bool = False,
) -> RewritePlan:
    """The rewrite of :func:`rewrite_checkpoint`, checked and planned but not written (reads the
    config and the shard headers; tensor data only for ``pad_uniform``'s dead selection biases).

    A rewrite (any mode) of a family :mod:`moeprune.arch.header_keys` knows maps the expert keys
    from the config and the headers alone; everything else builds the model on the meta device to
    find the MoE blocks and maps the keys with transformers' renaming (:func:`_model_keymap`)."""
    from .modelio import load_config, read_raw_config

    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'", f"use {' or '.join(MODES)}")
    if not (src / "config.json").is_file():
        raise UserError(f"'{src}' has no config.json", "pass a transformers model directory")
    raw_config = read_raw_config(src)
    from .arch.header_config import header_config

    light = header_config(raw_config)  # the families header_keys knows, without transformers' config classes
    config: Any = light if light is not None else load_config(str(src))
    quant = quant_format(config)  # fp8 / mxfp4 are copied as stored; other methods are refused
    _check_not_reshaped(config, src)
    ckpt = Checkpoint.open(src)
    mtp = mtp_keys(ckpt.tensors, raw_config)
    keymap = None
    if light is not None:
        from .arch.header_keys import header_key_map

        keymap = header_key_map(config, ckpt.shapes(), mtp)
    whole: dict[int, int] = {}
    from_headers = keymap is not None
    if keymap is not None:  # no model built: the keys and counts come from config.json and the headers
        blocks: list[Any] = list(keymap.blocks)
        check_mode(blocks, None, mode, pad_uniform, config)  # the model path's refusals, from the family's table
        kept, counts = check_kept(blocks, kept, top_k, mode)
        _check_expert_dtypes(ckpt, keymap, src, config)
    else:
        if light is not None:  # the model is built from transformers' config
            config = load_config(str(src))
        blocks, keymap, whole, kept, counts = _model_keymap(ckpt, src, config, kept, top_k, mode, pad_uniform)
    old_e = blocks[0].num_experts
    original_top_k = blocks[0].top_k
    _check_provenance(ckpt, keymap, plan, metadata, allow_other_profile)
    rewrites, layout, new_e = block_rewrites(blocks, kept, mode, pad_uniform, novices)
    if whole:  # recorded with their counts: the checkpoint is ragged unless nothing was removed
        layout.experts_per_layer.update(whole)
        new_e = max(new_e, *whole.values())

    tensors = plan_tensors(ckpt, keymap, rewrites, mtp)
    limit = parse_size(max_shard_size) if max_shard_size is not None else ckpt.max_shard_bytes
    shards = split_shards(tensors, limit)
    n = len(shards)
    names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(t.nbytes for t in tensors)
    new_config = pruned_config(raw_config, config, old_e, new_e, top_k, layout)
    if mtp:
        new_config["num_nextn_predict_layers"] = 0
    key_layout = "per-expert" if any(keymap.layout(b.index) == "per-expert" for b in blocks) else "fused"
    stock = mode == "remove" and len(set(layout.experts_per_layer.values())) == 1
    stock = stock or (mode == "novice" and pad_uniform)

    result = RewriteResult(
        out_dir=out,
        layers=[b.layer for b in blocks],
        num_experts=old_e,
        kept_per_layer=max(counts.values()),
        top_k=top_k if top_k is not None else original_top_k,
        original_top_k=original_top_k,
        shards=names,
        bytes_in=ckpt.total_bytes,
        bytes_out=total,
        layout=key_layout,
        mode=mode,
        kept_counts=counts,
        padded=pad_uniform,
        stock=stock,
        quantization=quant.label if quant is not None else None,
        dropped_mtp=len(mtp),
        whole_layers=sorted(whole),
    )

    return RewritePlan(
        ckpt,
        raw_config,
        new_config,
        layout,
        kept,
        tensors,
        shards,
        names,
        result,
        from_headers=from_headers,
        config=config if from_headers else None,
        blocks=blocks if from_headers else [],
        config_experts=new_e,
    )


def _model_keymap(
    ckpt: Checkpoint, src: Path, config: Any, kept: dict[int, list[int]], top_k: int | None, mode: str, pad_uniform: bool
) -> tuple[list[MoEBlock], ExpertKeyMap, dict[int, int], dict[int, list[int]], dict[int, int]]:
    """The MoE blocks and expert keys found on the model built on the meta device (every
    architecture and mode), its hash-routed layers kept whole, and the checked kept ids."""
    from .arch import find_moe_blocks
    from .arch.keys import map_expert_keys
    from .arch.variants import whole_layers
    from .modelio import build_on_meta

    meta_model = build_on_meta(config)
    blocks = find_moe_blocks(meta_model)
    check_mode(blocks, meta_model, mode, pad_uniform, config)
    whole = whole_layers(meta_model)  # DeepSeek-V4 hash layers: every expert kept (arch/variants.py)
    if whole and pad_uniform:
        raise UserError(
            "--pad-uniform cannot make this checkpoint stock: its hash-routed layers keep all their "
            "experts, so every layer would be padded back to the original count (nothing saved)",
            "drop --pad-uniform: the ragged checkpoint loads with moeprune.load",
        )
    kept, counts = check_kept(blocks, kept, top_k, mode)
    if any(b.num_experts != blocks[0].num_experts for b in blocks):
        raise UserError("this model has different expert counts per layer", "it is not supported yet")
    keymap = map_expert_keys(meta_model, blocks, ckpt.shapes())
    _check_copyable(ckpt, keymap, meta_model, src, config)
    return blocks, keymap, whole, kept, counts


def rewrite_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    kept: dict[int, list[int]],
    top_k: int | None = None,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
    *,
    plan: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    mode: str = "remove",
    pad_uniform: bool = False,
    novices: dict[int, Any] | None = None,
    allow_other_profile: bool = False,
    inputs: Sequence[Any] = (),
    into: Path | None = None,
) -> RewriteResult:
    """Write ``out_dir``: the checkpoint in ``src_dir`` keeping, in every MoE layer (decoder index ->
    sorted expert ids), only the experts ``kept``; ``top_k`` lowers the active experts per token.

    ``mode`` is ``remove`` or ``novice``; ``novices`` (novice mode) maps each layer to the constant
    outputs [R, H] of its replaced experts (torch tensors or numpy arrays), in ascending expert
    order. ``pad_uniform`` writes a checkpoint stock transformers loads: ragged layers padded with
    dead experts (remove), or novices stored as zeroed experts with a down bias (novice, experts
    with biases only).

    ``plan`` (the plan's JSON) is kept as ``plan.json`` and ``metadata`` (the profile's ``meta``) as
    ``profile-meta.json``; both feed the model card. Both are refused when they were made on a
    checkpoint with other router weights (:mod:`moeprune.identity`), and the profile when it was
    calibrated on other data than the plan's profile (unless ``allow_other_profile``). ``progress(done_bytes, total_bytes)`` is called
    while the weights are copied.

    ``out_dir`` is checked and written as :mod:`moeprune.outputs` says (never the input model nor
    one of the other ``inputs``, replaced only with ``force``); ``into`` instead writes into that
    existing folder, an output another writer owns (one-shot: its temporary output folder).
    """
    from .outputs import prepare_output

    src = Path(src_dir)
    out = Path(out_dir).expanduser()
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'", f"use {' or '.join(MODES)}")
    if not (src / "config.json").is_file():
        raise UserError(f"'{src}' has no config.json", "pass a transformers model directory")
    target = None
    if into is None:
        target = prepare_output(out, inputs=[("input model", src), *inputs], force=force, kind="model")
    rp = plan_rewrite(
        src,
        out,
        kept,
        top_k,
        metadata,
        plan=plan,
        max_shard_size=max_shard_size,
        mode=mode,
        pad_uniform=pad_uniform,
        novices=novices,
        allow_other_profile=allow_other_profile,
    )
    ckpt, names, result = rp.ckpt, rp.names, rp.result
    raw_config, new_config, layout, kept = rp.raw_config, rp.new_config, rp.layout, rp.kept
    total, n = result.bytes_out, len(names)

    if target is not None:
        target.need(total)
    with target if target is not None else contextlib.nullcontext(into) as tmp:
        done = 0

        def step(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if progress is not None:
                progress(done, total)

        for name, ordered in rp.shard_files():
            write_safetensors(tmp / name, ordered, rp.file_metadata, step)
        if n > 1:
            (tmp / INDEX_NAME).write_text(rp.index_text(), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
        if not result.stock:
            result.remote_code_problem = _mark_remote_code(tmp, rp, src)
        if not rp.from_headers:  # (header plans: tests/test_header_keys.py proves the same config)
            _self_check(tmp, layout, result.top_k)

        handled = {"config.json", INDEX_NAME, "README.md"} | {f.name for f in ckpt.shard_files}
        result.source = copy_source_files(src, tmp, handled)
        result.copied_files, result.skipped_files = result.source.copied, result.source.skipped
        original_card = inside(src / "README.md", model_root(src))
        if original_card is not None:
            shutil.copyfile(original_card, tmp / "README.original.md")
            result.copied_files.append("README.original.md")
        if plan is not None:
            (tmp / "plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        if metadata is not None:
            (tmp / "profile-meta.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(
            model_card(src, result, kept, raw_config, plan, metadata, layout), encoding="utf-8"
        )
    return result


def mtp_keys(keys: Iterable[str], raw_config: dict[str, Any]) -> set[str]:
    """The keys of multi-token-prediction layers (``num_nextn_predict_layers``; DeepSeek-V3/R1's
    ``model.layers.61``, GLM-4.5's last layer): decoder layers past ``num_hidden_layers`` that
    transformers ignores on load. They hold their own full set of routed experts, which no profile
    measures; copied whole they would disagree with the pruned expert count that the config now
    declares (a server using them for speculative decoding would fail on the shapes), so the
    output leaves them out and says ``num_nextn_predict_layers: 0``."""
    import re

    n_layers = raw_config.get("num_hidden_layers")
    if not raw_config.get("num_nextn_predict_layers") or not isinstance(n_layers, int):
        return set()
    past = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    out = set()
    for key in keys:
        m = past.search(key)
        if m and int(m.group(1)) >= n_layers:
            out.add(key)
    return out


def _check_provenance(
    ckpt: Checkpoint,
    keymap: ExpertKeyMap,
    plan: dict[str, Any] | None,
    profile_meta: dict[str, Any] | None,
    allow_other_profile: bool,
) -> None:
    """The plan and the profile were made on this checkpoint (router weights, when they record
    them), and the profile on the plan's data."""
    from .identity import KEY, check_router, keymap_router_digest

    recorded = [x.get(KEY) for x in (plan, profile_meta) if isinstance(x, dict)]
    if any(recorded):
        mine = keymap_router_digest(ckpt, keymap)
        fix = "make the profile and plan on this model"
        if plan is not None:
            check_router(plan.get(KEY), mine, "the plan", fix)
        if profile_meta is not None:
            check_router(profile_meta.get(KEY), mine, "the profile", fix)
    if plan is not None and profile_meta is not None and not allow_other_profile:
        from .plan import check_profile_data

        check_profile_data(plan.get("settings"), profile_meta, "the profile")


_INTEGER_DTYPES = ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64")


def _check_copyable(ckpt: Checkpoint, keymap: ExpertKeyMap, meta_model: Any, src: Path, config: Any) -> None:
    """What would be copied loads as the pruned model: no tensor that is no model tensor (the
    output would be refused by every strict loader, moeprune.load included), and, in a checkpoint
    that is not quantized, no expert weight stored as integers (loaded by a silent cast)."""
    from .load import expected_unexpected, refuse_inexact

    refuse_inexact(src, {"unexpected_keys": expected_unexpected(meta_model, keymap.stray)})
    _check_expert_dtypes(ckpt, keymap, src, config)


def _check_expert_dtypes(ckpt: Checkpoint, keymap: ExpertKeyMap, src: Path, config: Any) -> None:
    """In a checkpoint that is not quantized, no expert weight stored as integers."""
    if getattr(config, "quantization_config", None):
        return
    for key in keymap.keys:
        dtype = ckpt.info(key).dtype
        if dtype in _INTEGER_DTYPES:
            raise UserError(
                f"'{src}': expert tensor '{key}' is stored as {dtype} in a checkpoint that is not quantized",
                "the checkpoint is corrupted or mislabelled: re-download or re-save the model",
            )


def _check_not_reshaped(config: Any, src: Path) -> None:
    """Refuse a source whose tensors are not what its config's counts say (ragged or novice)."""
    try:
        layout = PrunedLayout.of_config(config)
    except (ValueError, TypeError):
        layout = None
    if layout is None:
        return
    counts = set(layout.experts_per_layer.values())
    if layout.novices_in_buffer or len(counts) > 1:
        raise UserError(
            f"'{src}' is a {'novice' if layout.mode == 'novice' else 'ragged'} checkpoint written by moeprune",
            "prune the original model instead",
        )


def _mark_remote_code(tmp: Path, rp: RewritePlan, src: Path) -> str | None:
    """Rewrite the ragged or novice ``config.json`` just written in ``tmp`` into one that stock
    transformers refuses and, where :mod:`moeprune.remote`'s loader is exact, one that it loads
    with ``trust_remote_code`` (beside ``modeling_moeprune.py``). Returns why no loader was
    written, None when one was. A plan from the headers gives the loader's spec without
    transformers (:func:`moeprune.arch.header_keys.header_serve_spec`); any other is read off the
    stock build of the written config on the meta device."""
    new_config, raw_config, layout = rp.new_config, rp.raw_config, rp.layout
    if rp.from_headers:
        from .arch.header_keys import header_serve_spec

        config = rp.config
        spec = header_serve_spec(config, rp.blocks, layout, rp.config_experts)
        problem = remote_code_problem(config, raw_config, None)
    else:
        from .modelio import build_on_meta, load_config

        config = load_config(str(src))
        meta = build_on_meta(load_config(str(tmp)))  # the stock build of the written config
        spec = serve_spec(meta, layout)
        problem = remote_code_problem(config, raw_config, meta)
    if spec.pop("unknown_tensors"):
        problem = problem or "moeprune's loader adds tensors the template does not know"
    mark_config(new_config, _model_type(config), spec if problem is None else None)
    (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
    if problem is None:
        write_modeling_file(tmp, _model_type(config))
    return problem


def _self_check(tmp: Path, layout: PrunedLayout, top_k: int) -> None:
    """The written config builds (with :func:`moeprune.load`'s reshaping) a model whose every MoE
    block has the layer's expert count and top-k."""
    from .arch import find_moe_blocks
    from .arch.pruned import apply_layout
    from .modelio import build_on_meta, load_config

    model = build_on_meta(load_config(str(tmp)))
    apply_layout(model, layout)
    wrong = []
    for b in find_moe_blocks(model):
        stored = next(iter(b.layout.tensors.values()))[0]
        routed = layout.router_experts(b.layer, b.num_experts)
        want = (layout.experts_per_layer[b.layer], routed, top_k)
        if (stored, b.num_experts, b.top_k) != want:
            wrong.append((b.layer, stored, b.num_experts, b.top_k, want))
    if wrong:
        raise AssertionError(f"pruned config builds blocks with (layer, experts, routed, top-k) {wrong[:3]}")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder to ``out``, atomically: :func:`moeprune.outputs.replace_dir`."""
    from .outputs import replace_dir

    replace_dir(tmp, out)
