"""Dry runs: what `prune` and `profile` would read, write, hold in memory and take, before they run.

Both work from a checkpoint's ``config.json`` and its shard headers alone (no tensor data is
read), so a plan for DeepSeek-R1 (163 shards, 689 GB) takes under a minute with no GPU and no
download of its weights (docs/benchmarks.md, "Plan at full scale").

- :func:`prune_estimate` runs the rewrite's own planning (:func:`moeprune.surgery.plan_rewrite`:
  the same key mapping, slicing, multi-token-prediction drop and shard split), so the output's
  shard names and sizes are exactly the ones the rewrite writes. Bytes read are the source byte
  ranges the rewrite copies (plus the headers), bytes written the shard files and the index. The
  rewrite's memory does not grow with the checkpoint (docs/benchmarks.md, "Checkpoint rewrite"):
  it holds what this planning holds, plus one copy buffer, so the peak is this process's peak
  after planning plus that buffer.
- :func:`profile_estimate` sizes the profile file from its tensor shapes (docs/profile-format.md)
  and the calibration pass's memory from the code that runs it. With ``offload="sequential"``
  (:mod:`moeprune.offload`) that is: the imports, the accumulator's sums (float64 [L, E, H] MoNE
  moments and the PreMoe histograms), the hidden states of every record and each batch's layer
  inputs, and the decoder layer that needs most, at the larger of its two phases. Loading: an
  unquantized layer at 1.7x its size while transformers converts it (measured, docs/benchmarks.md
  "Sequential offload"); a quantized one's other weights as stored and dequantized to the compute
  dtype, then its routed experts as stored. Running a batch: the layer (quantized routed experts
  as stored, one expert dequantized at a time, :mod:`moeprune.qexperts`) and one batch's activations
  through the layer. Without offload the whole model sits in memory in the compute dtype.

Time: the bytes to read and write at a bandwidth, ``bandwidth`` bytes/s when given, else a quick
measured read of the checkpoint's own largest shard (at most 256 MiB or 2 s; the file's cached
pages are dropped first where the OS allows). Shards that are holes (headers-only layouts,
:mod:`moeprune.testing.layouts`) give no meaningful figure: the time is then left out and the
output says to pass ``--bandwidth``. The profile's time covers reading the weights only: its
compute depends on the device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = [
    "Bandwidth",
    "ProfileEstimate",
    "PruneEstimate",
    "measure_bandwidth",
    "profile_estimate",
    "prune_estimate",
    "uniform_kept",
]

IMPORTS_BYTES = 400_000_000  # RSS after importing torch and transformers (docs/benchmarks.md: 252-396 MB)
LOAD_FACTOR = 1.7  # an unquantized layer's load peak over its size (docs/benchmarks.md, "Sequential offload")
_MEASURE_BYTES = 256 * 2**20
_MEASURE_SECONDS = 2.0
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --- bandwidth -------------------------------------------------------------------------------------


@dataclass
class Bandwidth:
    """Bytes per second and where the figure comes from (None: unknown, ``source`` says why)."""

    bytes_per_s: float | None
    source: str

    def seconds(self, nbytes: int) -> float | None:
        return nbytes / self.bytes_per_s if self.bytes_per_s else None


def parse_bandwidth(text: str | float | int) -> float:
    """``'1.5GB/s'``, ``'500MB'``, ``2e9`` -> bytes per second."""
    from .checkpoint import parse_size

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0 or math.isnan(text):
            raise UserError(f"bandwidth {text} must be positive", "pass e.g. --bandwidth 1.5GB/s")
        return float(text)
    s = str(text).strip()
    s = s[:-2] if s.lower().endswith("/s") else s
    try:
        value = float(s)  # bytes per second, e.g. 1e9
    except ValueError:
        value = None
    if value is not None:
        return parse_bandwidth(value)
    try:
        return float(parse_size(s))
    except UserError:
        raise UserError(
            f"--bandwidth '{text}' is not understood", "write it like 1.5GB/s, 500MB/s or bytes per second"
        ) from None


def measure_bandwidth(paths: Sequence[Path]) -> Bandwidth:
    """Time a read of up to 256 MiB (or 2 s) from the largest of ``paths`` that has data on disk,
    after asking the OS to drop its cached pages (so the figure is the disk's, not the page cache's,
    where that works: pages other processes keep mapped stay cached)."""
    files = sorted((p for p in paths if p.is_file()), key=lambda p: -p.stat().st_size)
    dense = [p for p in files if _allocated(p) >= 0.9 * p.stat().st_size > 0]
    if not dense:
        why = "the shards are sparse (no data on disk to time)" if files else "no shard to time"
        return Bandwidth(None, f"not measured: {why}; pass --bandwidth")
    path = dense[0]
    size = path.stat().st_size
    want = min(_MEASURE_BYTES, size)
    start_at = max(0, (size - want) // 2) // 4096 * 4096
    chunk = 16 * 2**20
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start_at, want, os.POSIX_FADV_DONTNEED)
        done, t0 = 0, time.perf_counter()
        while done < want and time.perf_counter() - t0 < _MEASURE_SECONDS:
            data = os.pread(fd, min(chunk, want - done), start_at + done)
            if not data:
                break
            done += len(data)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
    if done == 0 or seconds <= 0:
        return Bandwidth(None, f"not measured: nothing could be read from {path.name}; pass --bandwidth")
    rate = done / seconds
    return Bandwidth(rate, f"measured: {done / 1e6:.0f} MB of {path.name} in {seconds:.2f} s")


def _allocated(path: Path) -> int:
    st = path.stat()
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else blocks * 512


def _bandwidth(bandwidth: str | float | None, paths: Sequence[Path]) -> Bandwidth:
    if bandwidth is not None:
        rate = parse_bandwidth(bandwidth)
        return Bandwidth(rate, "given (--bandwidth)")
    return measure_bandwidth(paths)


def _reset_peak_rss() -> None:
    """Start a new high-water mark at the current RSS (Linux: ``/proc/self/clear_refs``); a no-op
    where that is not available."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int:
    """This process's peak resident memory so far (Linux: VmHWM; elsewhere ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# --- prune -----------------------------------------------------------------------------------------


@dataclass
class ShardSize:
    name: str
    bytes: int  # the file: header + tensor data
    tensors: int


@dataclass
class PruneEstimate:
    """What `moeprune prune` would write (sizes exact: the rewrite's own plan) and cost (estimates)."""

    model: str
    quantization: str | None
    mode: str
    layers: int  # MoE layers
    num_experts: int
    kept: list[int]  # distinct experts-per-layer counts
    top_k: int
    original_top_k: int
    shards: list[ShardSize]
    source_tensor_bytes: int
    source_file_bytes: int
    output_tensor_bytes: int
    bytes_read: int  # source byte ranges copied + the source headers
    bytes_written: int  # shard files + index (config, card and small files not counted)
    peak_memory: int
    dropped_mtp: int
    stock: bool
    bandwidth: Bandwidth
    seconds: float | None  # read + write at the bandwidth, one after the other
    plan_seconds: float = 0.0  # how long this dry run took
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["command"] = "prune --dry-run"
        out["output_file_bytes"] = sum(s.bytes for s in self.shards)
        return out


def uniform_kept(blocks: Sequence[Any], keep: int | float | str) -> dict[int, list[int]]:
    """The same number of experts kept in every MoE layer, for a dry run without a plan: ``keep``
    experts per layer (an int) or a fraction of them (a float, or text as ``--keep`` takes it),
    rounded as `moeprune plan` rounds it; with group-limited routing, the same number in every
    group. The first ones of each group are taken: every expert of a layer has the same bytes, so
    any plan with this count gives the same output bytes (its shard boundaries may fall a tensor
    apart, as the output keeps the source's tensor order)."""
    from .plan import experts_to_keep, parse_keep

    value = parse_keep(keep) if isinstance(keep, str) else keep
    b = blocks[0]
    n_group = b.spec.n_group if b.spec.n_group > 1 else 1
    k = experts_to_keep(value, b.num_experts, n_group=n_group)
    out: dict[int, list[int]] = {}
    for block in blocks:
        size = block.num_experts // n_group
        per = k // n_group
        out[block.layer] = [g * size + j for g in range(n_group) for j in range(per)]
    return out


def prune_estimate(
    src: str | os.PathLike,
    kept: dict[int, list[int]],
    *,
    top_k: int | None = None,
    mode: str = "remove",
    pad_uniform: bool = False,
    novices: dict[int, Any] | None = None,
    max_shard_size: int | str | None = None,
    bandwidth: str | float | None = None,
    plan: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    started: float | None = None,
) -> PruneEstimate:
    """The dry run of :func:`moeprune.surgery.rewrite_checkpoint` for the checkpoint ``src`` (same
    arguments): nothing is written, no tensor data is read (``pad_uniform`` reads the selection
    biases it pads with)."""
    from .checkpoint import _COPY_CHUNK, Piece
    from .surgery import INDEX_NAME, plan_rewrite

    t0 = started if started is not None else time.perf_counter()
    path = Path(src)
    _reset_peak_rss()  # the peak of planning, not of whatever this process did before
    rp = plan_rewrite(
        path,
        path.parent / f"{path.name}.dry-run",
        kept,
        top_k,
        metadata,
        plan=plan,
        max_shard_size=max_shard_size,
        mode=mode,
        pad_uniform=pad_uniform,
        novices=novices,
    )
    from .checkpoint import safetensors_header

    shards = []
    for name, ordered in rp.shard_files():
        header = safetensors_header(ordered, rp.file_metadata)
        shards.append(ShardSize(name, len(header) + sum(t.nbytes for t in ordered), len(ordered)))
    copied = sum(p.length for t in rp.tensors for p in t.pieces if isinstance(p, Piece))
    headers = _header_bytes(rp.ckpt)
    index = len(rp.index_text().encode("utf-8")) if len(rp.names) > 1 else 0
    written = sum(s.bytes for s in shards) + index
    generated = sum(p.length for t in rp.tensors for p in t.pieces if not isinstance(p, Piece))
    peak = _peak_rss() + _COPY_CHUNK + generated
    bw = _bandwidth(bandwidth, rp.ckpt.shard_files)
    read_s, write_s = bw.seconds(copied + headers), bw.seconds(written)
    result = rp.result
    notes = []
    if result.dropped_mtp:
        notes.append(
            f"{result.dropped_mtp} tensors of the multi-token-prediction layer left out (num_nextn_predict_layers 0)"
        )
    if not result.stock:
        notes.append("the output loads with moeprune.load(path), not stock from_pretrained")
    notes.append(f"needs {_gb(written)} free beside the output (written to a temporary folder, then renamed)")
    if index:
        notes.append(f"index {INDEX_NAME}: {index:,} bytes")
    return PruneEstimate(
        model=str(src),
        quantization=result.quantization,
        mode=mode,
        layers=len(result.layers),
        num_experts=result.num_experts,
        kept=sorted(set(result.kept_counts.values())),
        top_k=result.top_k,
        original_top_k=result.original_top_k,
        shards=shards,
        source_tensor_bytes=result.bytes_in,
        source_file_bytes=sum(f.stat().st_size for f in rp.ckpt.shard_files),
        output_tensor_bytes=result.bytes_out,
        bytes_read=copied + headers,
        bytes_written=written,
        peak_memory=peak,
        dropped_mtp=result.dropped_mtp,
        stock=result.stock,
        bandwidth=bw,
        seconds=None if read_s is None or write_s is None else read_s + write_s,
        plan_seconds=time.perf_counter() - t0,
        notes=notes,
    )


def _header_bytes(ckpt: Any) -> int:
    """The bytes of every shard's header (what opening the checkpoint reads)."""
    first: dict[Path, int] = {}
    for t in ckpt.tensors.values():
        if t.start < first.get(t.file, t.start + 1):
            first[t.file] = t.start
    return sum(first.get(f, f.stat().st_size) for f in ckpt.shard_files)


def _gb(n: float) -> str:
    from .card import human_bytes

    return human_bytes(n)


# --- profile ---------------------------------------------------------------------------------------


@dataclass
class ProfileEstimate:
    """What `moeprune profile` would write and hold (estimates; the file size from its shapes)."""

    model: str
    quantization: str | None
    offload: str
    device: str
    dtype: str
    layers: int  # MoE layers
    num_experts: int
    hidden_size: int
    records: int
    tokens: int
    tokens_source: str
    per_sample: bool
    premoe_exact: bool
    profile_bytes: int
    bytes_read: int
    memory: list[tuple[str, int]]  # the items of the peak
    peak_memory: int
    largest_layer: int | None  # decoder index of the layer that sets the peak (sequential)
    bandwidth: Bandwidth
    read_seconds: float | None
    plan_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["command"] = "profile --dry-run"
        out["memory"] = {label: nbytes for label, nbytes in self.memory}
        return out


def profile_bytes(
    layers: int, experts: int, hidden: int, samples: int, tokens: int, ka: int, per_sample: bool, exact: bool
) -> tuple[int, dict[str, tuple[int, ...]]]:
    """The size of a profile file with these dimensions, and its tensors' shapes
    (docs/profile-format.md; the header estimated with a typical ``meta``)."""
    from .calibrate import SUM_NAMES
    from .score import PREMOE_BINS, PREMOE_HIST

    L, E, H, S, B = layers, experts, hidden, samples, PREMOE_BINS
    shapes: dict[str, tuple[tuple[int, ...], int]] = {"tokens": ((1,), 8)}
    for name in SUM_NAMES:
        shapes[name] = ((L, E), 8)
    for name in PREMOE_HIST:
        shapes[name] = ((L, E, B), 8)
    shapes.update(
        premoe_edges=((B,), 8),
        premoe_qmax=((L,), 8),
        premoe_ka=((1,), 8),
        sample_premoe=((S, E), 8),
        sample_tokens=((S,), 8),
        mone_mean=((L, E, H), 4),
        mone_m2=((L, E, H), 4),
        novice_lsq=((L, E, H), 4),
    )
    if exact:
        for name in ("premoe_q", "premoe_f", "premoe_idx"):
            shapes[name] = ((L, tokens, ka), 4)
    if per_sample:
        shapes["sample_gate"] = ((S, L, E), 4)
    data = sum(math.prod(shape) * size for shape, size in shapes.values())
    # header: per tensor its entry and its sha256 checksum; meta (model, layers, data files, settings)
    entries = sum(len(name) + 90 + 2 * len(str(math.prod(s))) for name, (s, _) in shapes.items())
    header = entries + (len(shapes) + 1) * 80 + 1500 + 6 * L
    return data + header + (-header % 8) + 8, {k: v[0] for k, v in shapes.items()}


def profile_estimate(
    src: str | os.PathLike,
    *,
    records: int,
    tokens: int,
    tokens_source: str = "",
    max_length: int = 2048,
    batch_size: int = 8,
    offload: str = "none",
    dtype: str = "auto",
    device: str = "auto",
    per_sample: bool | None = None,
    premoe_exact: bool = False,
    premoe_ka: int | None = None,
    bandwidth: str | float | None = None,
    started: float | None = None,
) -> ProfileEstimate:
    """The dry run of a calibration pass over ``records`` records of ``tokens`` tokens in all
    (the other arguments as :func:`moeprune.api.profile` takes them) on the checkpoint ``src``."""
    import torch

    from .arch import find_moe_blocks
    from .calibrate import wants_per_sample
    from .checkpoint import Checkpoint
    from .device import check_device, check_dtype, resolve_dtype
    from .modelio import build_on_meta, load_config
    from .quant import quant_format

    t0 = started if started is not None else time.perf_counter()
    path = Path(src)
    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_dtype(dtype)  # before the config, as the run itself checks it
    if offload not in ("none", "sequential"):
        raise UserError(f"unknown --offload '{offload}'", "use --offload none or sequential")
    config = load_config(str(path))
    dtype_name = resolve_dtype(dtype, device, config)
    dt = _DTYPE_BYTES[dtype_name]
    fmt = quant_format(config)
    config.dtype = getattr(torch, dtype_name)
    model = build_on_meta(config)
    blocks = find_moe_blocks(model)
    ckpt = Checkpoint.open(path)
    text = model.config.get_text_config()
    L, E, H, k = len(blocks), blocks[0].num_experts, int(text.hidden_size), blocks[0].top_k
    ka = int(premoe_ka or k)
    if not 1 <= ka <= E:
        raise UserError(f"--premoe-ka {ka} is outside 1..{E}", f"pass at most {E}")
    if records < 1 or tokens < 1:
        raise UserError("the calibration data holds no tokens", "pass --data with at least one record")
    keep_per_sample, _ = wants_per_sample(per_sample, records, L, E)
    size, _ = profile_bytes(L, E, H, records, tokens, ka, keep_per_sample, premoe_exact)

    # the accumulator (calibrate.Accumulator), float64 while accumulating
    from .score import PREMOE_BINS

    acc = 8 * (6 * L * E + L + 2 * L * E * H + 3 * L * E * PREMOE_BINS + L + records * E)
    if keep_per_sample:
        acc += 8 * L * records * E
    if premoe_exact:
        acc += 12 * L * tokens * ka
    batch_tokens = min(batch_size, records) * max_length
    activations = _batch_activations(text, k, batch_tokens, dt, blocks)
    memory: list[tuple[str, int]] = [("imports (torch, transformers)", IMPORTS_BYTES)]
    memory.append(("profile statistics (float64 sums, MoNE moments, PreMoe histograms)", acc))
    notes = []
    largest = None
    if offload == "sequential":
        layer_items, largest, read = _sequential(
            model, ckpt, blocks, fmt, path, dt, dtype_name, activations, batch_tokens
        )
        n_batches = math.ceil(records / batch_size)
        memory.append(("hidden states of every record (entering the next layer)", tokens * H * dt))
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        rope = int(getattr(text, "qk_rope_head_dim", 0) or getattr(text, "head_dim", 0) or H // heads)
        mask = n_batches * batch_size * max_length * max_length  # bool [B, 1, S, S] per padded batch
        pos = n_batches * batch_tokens * rope * dt * 2
        memory.append(("layer inputs of every batch (causal masks, position embeddings)", mask + pos))
        memory += layer_items
    else:
        from .surgery import mtp_keys

        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        skip = mtp_keys(ckpt.tensors, raw)
        read = sum(t.nbytes for key, t in ckpt.tensors.items() if key not in skip)
        params = sum(p.numel() for p in model.parameters())
        on_gpu = device.startswith("cuda")
        if fmt is not None and on_gpu and fmt.method == "fp8":
            weights = read
            what = f"the model as stored ({fmt.label}; transformers' fp8 kernels)"
        else:
            weights = params * dt
            what = f"the model in {dtype_name}" + (" (dequantized on load)" if fmt is not None else "")
        memory.append((what, weights))
        memory.append((f"one batch through the model ({batch_tokens:,} tokens, per layer)", activations))
        notes.append("plus transformers' transient copies while it loads the checkpoint")
    peak = sum(n for _, n in memory)
    bw = _bandwidth(bandwidth, ckpt.shard_files)
    if fmt is not None:
        notes.insert(0, f"{fmt.label} checkpoint")
    notes.append("time: reading the weights once at the bandwidth; the forward passes come on top")
    return ProfileEstimate(
        model=str(src),
        quantization=fmt.label if fmt is not None else None,
        offload=offload,
        device=device,
        dtype=dtype_name,
        layers=L,
        num_experts=E,
        hidden_size=H,
        records=records,
        tokens=tokens,
        tokens_source=tokens_source,
        per_sample=keep_per_sample,
        premoe_exact=premoe_exact,
        profile_bytes=size,
        bytes_read=read,
        memory=memory,
        peak_memory=peak,
        largest_layer=largest,
        bandwidth=bw,
        read_seconds=bw.seconds(read),
        plan_seconds=time.perf_counter() - t0,
        notes=notes,
    )


def _batch_activations(text: Any, k: int, tokens: int, dt: int, blocks: Sequence[Any]) -> int:
    """One batch's activations in one decoder layer: every selected expert's output [T, k, H] (and
    its float32 copy for the statistics), one expert's intermediate on all its tokens, the
    attention's projections, and a few hidden-state tensors (attention scores are not
    materialized by the fused attention kernels and are not counted)."""
    H = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    head = int(getattr(text, "head_dim", 0) or 0) or H // heads
    qk = int(getattr(text, "qk_nope_head_dim", 0) or 0) + int(getattr(text, "qk_rope_head_dim", 0) or 0)
    v = int(getattr(text, "v_head_dim", 0) or 0) or head
    qk = qk or head
    layout = blocks[0].layout
    inter = max((shape[1] for name, shape in layout.tensors.items() if "gate_up" in name or "up_proj" in name),
                default=H)  # fmt: skip
    outputs = tokens * k * H * (dt + (4 if dt != 4 else 0))
    expert = tokens * inter * dt
    attention = tokens * heads * (2 * qk + 2 * v) * dt
    hidden = 4 * tokens * H * dt
    return outputs + expert + attention + hidden


def _sequential(
    model: Any,
    ckpt: Any,
    blocks: Sequence[Any],
    fmt: Any,
    path: Path,
    dt: int,
    dtype_name: str,
    activations: int,
    batch_tokens: int,
) -> tuple[list[tuple[str, int]], int, int]:
    """The memory of the decoder layer that needs the most with --offload sequential
    (:mod:`moeprune.offload`), at the larger of its two phases (loading it; running a batch
    through it), as labelled items; that layer's index; and the bytes the pass reads (the text
    model outside its layers but the LM head, and every layer up to the last MoE layer)."""
    import torch

    from .arch import decoder_layers
    from .arch.blocks import layers_path as find_layers_path
    from .offload import loader_config, plan_keys
    from .quant import is_companion

    lpath = find_layers_path(model)
    load_cfg = loader_config(model, path, torch.device("meta"), getattr(torch, dtype_name))
    keys = plan_keys(model, ckpt.keys(), load_cfg.weight_mapping, lpath, quantized=fmt is not None)
    last = max(b.layer for b in blocks)
    absent = [i for i in range(last + 1) if i not in keys.layers]
    if absent:
        raise UserError(f"the checkpoint has no tensor of decoder layer {absent[0]}", "check the model")
    read = sum(ckpt.info(k).nbytes for k in keys.prefix)
    prefix_float = sum(ckpt.info(k).numel for k in keys.prefix if not is_companion(k)) * dt
    layers = decoder_layers(model)
    best: tuple[int, list[tuple[str, int]]] | None = None
    for i in range(last + 1):
        layer_keys = keys.layers[i]
        read += sum(ckpt.info(k).nbytes for k in layer_keys)
        held: set[str] = set()
        experts_paths = [b.experts_path for b in blocks if b.layer == i]
        if fmt is not None and experts_paths:
            from .qexperts import split_expert_keys

            held = split_expert_keys(
                model, experts_paths, list(layer_keys), fmt, load_cfg.weight_mapping
            ).keys()
        stored = sum(ckpt.info(k).nbytes for k in held)
        plain = [k for k in layer_keys if k not in held]
        plain_stored = sum(ckpt.info(k).nbytes for k in plain)
        # the layer's own parameters in the compute dtype (quantized experts aside: kept as stored)
        held_params = _held_param_numel(model, experts_paths) if held else 0
        plain_float = (sum(p.numel() for p in layers[i].parameters()) - held_params) * dt
        run = (f"one batch through layer {i} ({batch_tokens:,} tokens)", activations)
        if fmt is None:
            # loading: transformers' conversion holds a transient copy (measured 1.7x the layer);
            # running: the layer and one batch's activations
            load = [(f"decoder layer {i} while transformers loads it ({LOAD_FACTOR}x its {dtype_name} size)",
                     int(LOAD_FACTOR * plain_float))]  # fmt: skip
            running = [(f"decoder layer {i} in {dtype_name}", plain_float), run]
        else:
            b = next((b for b in blocks if b.layer == i), None)
            expert = 0
            if b is not None:
                per = b.layout.params_per_expert()
                rows = max(math.prod(s[1:]) for s in b.layout.tensors.values())
                expert = per * dt * 2 + rows * 4  # one expert dequantized, its copy, a float32 temporary
            experts = (f"decoder layer {i}: routed experts as stored ({fmt.label})", stored)
            other = f"decoder layer {i}: its other weights in {dtype_name}"
            # loading: the other weights read as stored and dequantized, then the experts read
            load = [(other + " (and as stored, while dequantized)", plain_float + plain_stored)]
            if stored > plain_stored:
                load = [experts, (other, plain_float)]
            running = [experts, (other, plain_float), ("one expert dequantized while it runs", expert), run]
        items = max(load, running, key=lambda xs: sum(n for _, n in xs))
        total = sum(n for _, n in items)
        if best is None or total > sum(n for _, n in best[1]):
            best = (i, items)
    assert best is not None
    largest, items = best
    # the embedding and final norm (prefix_float) are freed once the layer inputs are captured,
    # before the first layer is read: below the peak unless a layer is smaller than them
    if prefix_float > sum(n for _, n in items):
        items = [("embedding and final norm (until the layer inputs are captured)", prefix_float)]
    return items, largest, read


def _held_param_numel(model: Any, experts_paths: Sequence[str]) -> int:
    total = 0
    for p in experts_paths:
        total += sum(t.numel() for t in model.get_submodule(p).parameters(recurse=False))
    return total
