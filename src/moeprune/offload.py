"""Sequential (layer-by-layer) calibration for models larger than memory.

:func:`calibrate_sequential` returns exactly what :func:`moeprune.calibrate.calibrate` returns for
the same records, while holding only one decoder layer's weights (plus the activations of every
calibration record) in memory:

1. the model is built on the meta device from its config; its MoE blocks are found there;
2. only the tensors of the text model that live outside its decoder layers are loaded (embedding,
   final norm; never the LM head), non-persistent buffers (rotary ``inv_freq``) are recomputed by
   transformers' own ``_init_weights``, and the text model's real ``forward`` is run over every
   batch with each decoder layer replaced by a stub that records its ``(args, kwargs)`` (causal
   mask, position ids, position embeddings, ...) and stops the forward after the last MoE layer
   (the "sequential onloading" trick). The hidden states entering layer 0 are kept per batch;
   the embedding is then freed;
3. every decoder layer up to the last MoE layer is, in turn, read from the safetensors shards
   (only that layer's keys, through lazy ``get_slice`` handles opened for that layer alone),
   converted from the checkpoint layout to the model's (hub per-expert keys -> fused 3D tensors)
   by transformers' own ``convert_and_load_state_dict_in_model``, run over every batch under
   :func:`~moeprune.arch.patch_moe` (the accumulator observes its MoE blocks), and put back on
   the meta device. Its outputs replace the stored hidden states.

Memory: one layer's weights (plus the transient copies of its conversion), the hidden states of
every record (tokens x hidden x dtype), and each batch's layer inputs (masks, position
embeddings), kept on CPU. To keep the peak at about 1.7 x the largest layer above the resting
RSS (docs/benchmarks.md, "Sequential offload"), shards are read with safetensors' ``pread``
backend (no mapped pages), transformers converts one tensor group at a time (no loader threads,
see ``ASYNC_LOAD``), the heap is trimmed after each layer, and glibc maps every buffer of
1 MB or more on its own (``MMAP_THRESHOLD``: the heap kept a bf16 layer's per-expert buffers).

Reading overlaps computing (``PREFETCH``): while layer i runs over every batch, a background thread
reads layer i+1's byte ranges from the shards (``os.preadv`` into fresh buffers, which releases
the GIL), never more than one layer ahead; layer i+1 is then converted from those tensors. The
price is one layer's stored bytes more at the peak.

Quantized checkpoints (fp8 block-wise, mxfp4; :mod:`moeprune.quant`): every quantized weight of
a layer outside its routed experts is dequantized to the compute dtype when the layer is read; the
routed experts stay as stored (fp8 bytes and scales) and each expert is dequantized when it runs
(:mod:`moeprune.qexperts`), so a layer costs about its stored size, not its float size.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError

__all__ = ["ShardReader", "calibrate_sequential", "plan_keys"]


class _StopForward(Exception):
    """Raised by the last layer stub: the rest of the model is not needed."""


# --- reading one layer's tensors ----------------------------------------------------------------


class ShardReader:
    """Lazy slices of some keys of a safetensors checkpoint. Shards are opened for one
    :meth:`open` only. The ``pread`` backend of safetensors >= 0.7 (read into fresh buffers) is
    used where available: with ``mmap`` the pages a layer touches count in the process's RSS
    while its shards are open."""

    def __init__(self, directory: str | Path, backend: str = "pread") -> None:
        from .checkpoint import Checkpoint

        self.checkpoint = Checkpoint.open(directory)
        self.backend = backend

    def keys(self) -> list[str]:
        return self.checkpoint.keys()

    @contextmanager
    def open(self, keys: Sequence[str]) -> Iterator[dict[str, Any]]:
        """``{key: safetensors slice}`` for ``keys`` (read from disk only when indexed)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.checkpoint.info(key).file, []).append(key)
        with ExitStack() as stack:
            slices: dict[str, Any] = {}
            for path, names in by_file.items():
                fh = stack.enter_context(self._open(safe_open, path))
                for name in names:
                    slices[name] = fh.get_slice(name)
            yield slices

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{key: tensor}`` for ``keys``, read now: each tensor's byte range with ``os.preadv``
        into a fresh buffer (no mapped pages; the GIL is released while the kernel copies, so a
        background thread reads while torch computes). Dtypes torch has no plain equivalent for
        are read through safetensors."""
        out: dict[str, torch.Tensor] = {}
        rest: list[str] = []
        fds: dict[Path, int] = {}
        try:
            for key in keys:
                info = self.checkpoint.info(key)
                dtype = _TORCH_DTYPES.get(info.dtype)
                if dtype is None:
                    rest.append(key)
                    continue
                if info.file not in fds:
                    fds[info.file] = os.open(info.file, os.O_RDONLY)
                buf = bytearray(info.nbytes)
                done = 0
                while done < info.nbytes:
                    n = os.preadv(fds[info.file], [memoryview(buf)[done:]], info.start + done)
                    if n <= 0:
                        raise UserError(f"'{info.file}' ends inside tensor '{key}'", "re-download the model")
                    done += n
                flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
                out[key] = flat.view(dtype).reshape(info.shape)
        finally:
            for fd in fds.values():
                os.close(fd)
        if rest:
            with self.open(rest) as slices:
                out.update({k: slices[k][:] for k in rest})
        return out

    def _open(self, safe_open, path: Path):
        if self.backend != "mmap":
            try:
                return safe_open(str(path), framework="pt", backend=self.backend)
            except TypeError:  # safetensors < 0.7: no backend argument
                self.backend = "mmap"
        return safe_open(str(path), framework="pt")


_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

PREFETCH = True  # read layer i+1 on a background thread while layer i computes (module docstring)
# Read ahead only while the next layer's bytes take at most this share of the memory still
# available: a DeepSeek-V3-width layer (11.5 GB of fp8 experts) read ahead beside the one computing
# would double the peak on a 24 GiB host, where reading lazily keeps it at ~1.2 x one layer.
PREFETCH_SHARE = 0.5


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def room_to_prefetch(nbytes: int) -> bool:
    """Whether a layer of ``nbytes`` as stored may be read ahead (:data:`PREFETCH_SHARE`)."""
    free = available_memory()
    return free is None or nbytes <= PREFETCH_SHARE * free


class _Prefetch:
    """At most one layer's tensors read ahead on one background thread; ``seconds`` adds up the
    time the reads took (for the timings of :func:`calibrate_sequential`)."""

    def __init__(self, reader: ShardReader) -> None:
        self.reader = reader
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeprune-prefetch")
        self.seconds = 0.0

    def _read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self.reader.read(keys)
        finally:
            self.seconds += time.perf_counter() - t0

    def submit(self, keys: Sequence[str]) -> Future:
        return self.pool.submit(self._read, list(keys))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _stored_bytes(reader: ShardReader, keys: Sequence[str]) -> int:
    tensors = reader.checkpoint.tensors
    return sum(tensors[k].nbytes for k in keys if k in tensors)


@dataclass
class KeyPlan:
    """Which checkpoint keys feed which part of the model (after transformers' renaming)."""

    layers: dict[int, list[str]] = field(default_factory=dict)  # decoder-layer index -> keys
    prefix: list[str] = field(default_factory=list)  # text model outside its layers (embedding, norm)
    other: list[str] = field(default_factory=list)  # never loaded (LM head, towers, unknown keys)
    unknown: list[str] = field(default_factory=list)  # the keys of ``other`` that are no model tensor


def plan_keys(
    model: nn.Module, keys: Sequence[str], weight_mapping: list, layers_path: str, quantized: bool = False
) -> KeyPlan:
    """Group checkpoint ``keys`` by the model tensor each becomes, with the renaming rules
    ``from_pretrained`` applies (``weight_mapping`` = ``get_model_conversion_mapping(model)``).
    In a ``quantized`` checkpoint a scale (``X.weight_scale_inv``, ``experts.down_proj_scales``)
    goes where the weight it qualifies goes."""
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    from .quant import companion_of

    renamings = [w for w in weight_mapping if isinstance(w, WeightRenaming)]
    converters = [w for w in weight_mapping if isinstance(w, WeightConverter)]
    meta_sd = model.state_dict()
    base_prefix = model.base_model_prefix
    text_prefix = layers_path.rpartition(".")[0]
    head = model.get_output_embeddings()
    head_path = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    layer_re = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")
    plan = KeyPlan()
    for key in sorted(keys, key=dot_natural_key):  # the order transformers uses (stateful renamings)
        base = key
        if quantized:
            base = companion_of(key) or key
            if key.endswith((".input_scale", ".activation_scale")):
                base = key.rpartition(".")[0] + ".weight"
        renamed, _ = rename_source_key(base, renamings, converters, base_prefix, meta_sd)
        if renamed not in meta_sd and base in meta_sd:
            renamed = base
        m = layer_re.match(renamed)
        if m:
            plan.layers.setdefault(int(m.group(1)), []).append(key)
        elif (
            renamed in meta_sd
            and (not text_prefix or renamed.startswith(text_prefix + "."))
            and not (head_path and renamed.startswith(head_path + "."))
        ):
            plan.prefix.append(key)
        else:
            plan.other.append(key)
            if renamed not in meta_sd:
                plan.unknown.append(key)
    return plan


ASYNC_LOAD = False  # transformers' loader threads: every tensor of a layer read at once (more memory)


@contextmanager
def _quiet_sync_loading() -> Iterator[None]:
    """No "Loading weights" bar; unless ``ASYNC_LOAD``, tensors read one conversion at a time
    (``HF_DEACTIVATE_ASYNC_LOAD``, read by transformers at each call)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    env = "HF_DEACTIVATE_ASYNC_LOAD"
    before = os.environ.get(env)
    if enabled:
        hf_logging.disable_progress_bar()
    if not ASYNC_LOAD:
        os.environ[env] = "1"
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
        if not ASYNC_LOAD:
            if before is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = before


def _load_tensors(
    model: nn.Module,
    reader: ShardReader,
    keys: Sequence[str],
    load_config: Any,
    fmt: Any = None,
    experts_paths: Sequence[str] = (),
    tensors: dict[str, torch.Tensor] | None = None,
) -> Any:
    """Load ``keys`` into ``model`` with transformers' own renaming and conversion. In a quantized
    checkpoint (``fmt``), the routed experts of the modules at ``experts_paths`` stay as stored
    (:mod:`moeprune.qexperts`, dequantized one expert at a time when they run) and every other
    quantized weight is dequantized to the load dtype. ``tensors``: the keys already read
    (:class:`_Prefetch`); otherwise they are read lazily, one conversion at a time."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model

    from .load import expected_unexpected, refuse_inexact

    source = nullcontext(tensors) if tensors is not None else reader.open(keys)
    if fmt is None:
        with source as slices, _quiet_sync_loading():
            info, _ = convert_and_load_state_dict_in_model(model, slices, load_config)
    else:
        info = _load_quantized(model, source, keys, load_config, fmt, experts_paths)
    # a checkpoint tensor that lands nowhere in the model (the config claims fewer layers or
    # experts than the checkpoint holds) is an error, as in moeprune.load
    refuse_inexact(
        reader.checkpoint.directory, {"unexpected_keys": expected_unexpected(model, info.unexpected_keys)}
    )
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys, key=str)[0]
        raise UserError(
            f"checkpoint tensor for '{name}' has shape {list(got)}, the model expects {list(want)}",
            "the checkpoint does not match its config.json",
        )
    if info.conversion_errors:
        first = next(iter(info.conversion_errors.items()))
        raise UserError(
            f"could not convert checkpoint tensor(s) for {first[0]}: {first[1]}", "check the model"
        )
    return info


def _load_quantized(
    model: nn.Module, source: Any, keys: Sequence[str], load_config: Any, fmt: Any, experts_paths
) -> Any:
    from transformers.core_model_loading import convert_and_load_state_dict_in_model

    from . import qexperts
    from .quant import dequantize_tensors

    split = qexperts.split_expert_keys(
        model, list(experts_paths), list(keys), fmt, load_config.weight_mapping
    )
    held = split.keys()
    with source as slices:  # {key: slice or tensor}: both read with [:]
        plain = dequantize_tensors({k: slices[k][:] for k in keys if k not in held}, fmt, load_config.dtype)
        with _quiet_sync_loading():
            info, _ = convert_and_load_state_dict_in_model(model, plain, load_config)
        del plain
        for path, entries in split.by_module.items():
            tensors = {key: slices[key][:] for items in entries.values() for key, *_ in items}
            ops = {name: split.operations.get((path, name), []) for name in entries}
            module = model.get_submodule(path)
            store = qexperts.build(fmt, entries, ops, tensors)
            qexperts.check_complete(store, module, path)
            qexperts.attach(module, store)
    return info


def _materialize_buffers(model: nn.Module, root: nn.Module, root_path: str, device: torch.device) -> None:
    """Recompute the non-persistent buffers under ``root`` (not in any checkpoint: rotary
    ``inv_freq``, ...) with transformers' own ``_init_weights``; check every one was written."""
    for name, mod in root.named_modules():
        own = [b for b in mod._non_persistent_buffers_set if getattr(mod, b, None) is not None]
        own = [b for b in own if getattr(mod, b).is_meta]
        if not own:
            continue
        for b in own:
            buf = getattr(mod, b)
            fill = torch.full_like(buf, float("nan"), device=device) if buf.is_floating_point() else None
            setattr(mod, b, fill if fill is not None else torch.zeros_like(buf, device=device))
        if getattr(mod, "_is_hf_initialized", False):
            mod._is_hf_initialized = False
        model._init_weights(mod)
        for b in own:
            value = getattr(mod, b)
            if value.is_meta or (value.is_floating_point() and bool(torch.isnan(value).any())):
                path = ".".join(p for p in (root_path, name, b) if p)
                raise UserError(
                    f"cannot recompute the non-persistent buffer '{path}' ({type(mod).__name__})",
                    "this model cannot be calibrated with --offload sequential; load it whole",
                )


def loader_config(model: nn.Module, path: str | Path, device: torch.device, dtype: torch.dtype) -> Any:
    """What transformers' ``convert_and_load_state_dict_in_model`` needs to load checkpoint tensors
    into ``model`` as ``from_pretrained`` would (its key renamings and conversions, dtype plan)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.modeling_utils import LoadStateDictConfig

    return LoadStateDictConfig(
        pretrained_model_name_or_path=str(path),
        device_map={"": device},
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=get_model_conversion_mapping(model),
    )


def _check_loaded(module: nn.Module, path: str, what: str) -> None:
    from .qexperts import held_params

    held = {
        f"{name}.{p}".lstrip(".") for name, mod in module.named_modules() for p in held_params(mod)
    }  # quantized experts kept as stored
    missing = [n for n, p in module.named_parameters() if p.is_meta and n not in held]
    missing += [n for n, b in module.named_buffers() if b.is_meta]
    if missing:
        where = f"{path}.{missing[0]}" if path else missing[0]
        raise UserError(
            f"the checkpoint has no tensor for '{where}' ({len(missing)} missing in {what})",
            "the checkpoint does not match its config.json",
        )


def _free(module: nn.Module) -> None:
    """Put every tensor of ``module`` back on the meta device (the memory is released)."""
    from .qexperts import detach

    for mod in module.modules():
        detach(mod)
    module.to_empty(device="meta")
    _trim_heap()


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: the many per-expert
    buffers of a layer load fragment the heap and RSS would creep up layer after layer)."""
    import ctypes
    import sys
    from contextlib import suppress

    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):  # not glibc (musl, ...)
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# Buffers from this size up are mapped on their own and unmapped when freed (glibc's
# M_MMAP_THRESHOLD). glibc's default threshold moves up to 32 MB with the freed sizes, after which
# the per-expert buffers of a layer (bf16 weights of 16 MB, the varying [tokens of one expert, H]
# blocks) come from the heap, and the heap kept them: the bf16 gpt-oss-width profile rested GBs
# above its live tensors.
MMAP_THRESHOLD = 1 << 20


def _bound_heap() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (no-op elsewhere)."""
    import ctypes
    import sys
    from contextlib import suppress

    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


class _Carried:
    """Stands, during the capture, for the j-th extra output of a decoder layer that the text
    model hands to the next layer (HY-V4: the sparse-attention indexer's ``topk_indices``, passed
    on as ``prev_topk_indices``); replaced by the real output layer by layer."""

    def __init__(self, j: int) -> None:
        self.j = j


# extra outputs a decoder layer may return besides its hidden states (tried in turn by the capture)
_MAX_EXTRA_OUTPUTS = 3


def _with_carried(obj: Any, carried: tuple) -> Any:
    """``obj`` (captured layer args/kwargs) with each :class:`_Carried` replaced by its real value."""
    if isinstance(obj, _Carried):
        return carried[obj.j]
    if isinstance(obj, tuple):
        return tuple(_with_carried(x, carried) for x in obj)
    if isinstance(obj, list):
        return [_with_carried(x, carried) for x in obj]
    if isinstance(obj, dict):
        return {k: _with_carried(v, carried) for k, v in obj.items()}
    return obj


@dataclass
class _Batch:
    indices: list[int]
    ids: torch.Tensor | None  # [B, S] input ids (CPU), dropped once the layer inputs are captured
    mask: torch.Tensor  # [B, S] attention mask (CPU)
    tokens: int
    hidden: torch.Tensor | None = None  # [B, S, H] entering the next layer (CPU)
    inputs: dict[int, tuple[tuple, dict]] = field(default_factory=dict)  # layer -> (args, kwargs)
    carried: tuple = ()  # the previous layer's extra outputs (CPU), see _Carried


def _forward_kwargs(module: nn.Module) -> dict[str, Any]:
    import inspect

    params = inspect.signature(module.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _capture(text_model: nn.Module, layers: nn.ModuleList, last: int, batch: _Batch, device) -> int:
    """Run the text model's own forward up to layer ``last`` with every layer stubbed: records each
    layer's (args, kwargs) and the hidden states entering layer 0. Returns how many extra outputs
    the layers return besides their hidden states (the model unpacks them: tried 0, 1, ...)."""
    for extra in range(_MAX_EXTRA_OUTPUTS + 1):
        try:
            _capture_with(text_model, layers, last, batch, device, extra)
        except (ValueError, TypeError) as exc:
            if "unpack" not in str(exc) or extra == _MAX_EXTRA_OUTPUTS:
                raise
            batch.inputs.clear()
            continue
        return extra
    raise AssertionError("unreachable")


def _capture_with(
    text_model: nn.Module, layers: nn.ModuleList, last: int, batch: _Batch, device, extra: int
) -> None:
    def stub(i: int):
        def forward(*args, **kwargs):
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                batch.hidden = hidden.detach().to("cpu")
            batch.inputs[i] = (_to(rest, torch.device("cpu")), _to(kwargs, torch.device("cpu")))
            if i == last:
                raise _StopForward
            return (hidden, *(_Carried(j) for j in range(extra))) if extra else hidden

        return forward

    for i in range(last + 1):
        layers[i].forward = stub(i)
    try:
        text_model(
            input_ids=batch.ids.to(device),
            attention_mask=batch.mask.to(device),
            **_forward_kwargs(text_model),
        )
    except _StopForward:
        pass
    else:
        raise RuntimeError("the text model finished its forward without reaching its last MoE layer")
    finally:
        for i in range(last + 1):
            del layers[i].forward
    batch.ids = None
    if batch.hidden is None or len(batch.inputs) != last + 1:
        raise RuntimeError("the text model did not call its decoder layers in order")


@torch.no_grad()
def calibrate_sequential(
    model_dir: str | Path,
    seqs: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    premoe_ka: int | None = None,
    per_sample: bool = False,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    premoe_exact: bool = False,
    timings: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """The profile tensors of :func:`moeprune.calibrate.calibrate` for the model in ``model_dir``
    (a local directory or cached hub id with safetensors weights), computed one decoder layer at
    a time (see the module docstring). Under torch.distributed, each rank takes records rank,
    rank+world, ... and all ranks return the combined tensors.

    ``timings``, when given, receives the seconds the layers spent in each phase: ``read`` (bytes
    read from the shards, on the background thread with ``PREFETCH``), ``wait`` (the calibration
    waiting for a read), ``convert`` (into the model's layout) and ``compute`` (the forwards)."""
    from .arch import decoder_layers, find_moe_blocks, patch_moe
    from .arch.blocks import layers_path as find_layers_path
    from .arch.extended import init_routers_after_load
    from .calibrate import Accumulator, _Progress, check_profilable, dist_info
    from .data import batches
    from .load import expected_unexpected, refuse_inexact
    from .modelio import build_on_meta, load_config, resolve_model_dir
    from .quant import check_quantized, quant_format

    device = torch.device(device)
    _bound_heap()
    path = resolve_model_dir(str(model_dir))
    reader = ShardReader(path)
    config = load_config(str(path))
    fmt = quant_format(config)  # fp8 / mxfp4 read as stored; any other method is refused here
    if fmt is not None:
        check_quantized(reader.keys(), fmt, path)
    config.dtype = dtype  # build_on_meta (from_config) builds in config.dtype
    model = build_on_meta(config).eval()
    blocks = find_moe_blocks(model)
    check_profilable(config, blocks)
    layers = decoder_layers(model)
    lpath = find_layers_path(model)
    text_path = lpath.rpartition(".")[0]
    text_model = model.get_submodule(text_path) if text_path else model
    last = max(b.layer for b in blocks)

    load_config_ = loader_config(model, path, device, dtype)
    plan = plan_keys(model, reader.keys(), load_config_.weight_mapping, lpath, quantized=fmt is not None)
    absent = [i for i in range(last + 1) if i not in plan.layers]
    if absent:
        raise UserError(f"the checkpoint has no tensor of decoder layer {absent[0]}", "check the model")
    # layers past the config's count, and keys that are no tensor of the model, are never loaded
    # here: refuse them up front, as moeprune.load does
    extra = [k for i, ks in plan.layers.items() if i >= len(layers) for k in ks] + plan.unknown
    refuse_inexact(path, {"unexpected_keys": expected_unexpected(model, extra)})

    hidden_size = int(model.config.get_text_config().hidden_size)
    acc = Accumulator(
        blocks, hidden_size, [len(s) for s in seqs], premoe_ka, per_sample, device, premoe_exact=premoe_exact
    )
    info = dist_info()
    mine = list(range(info.rank, len(seqs), info.world))
    work = [
        _Batch(b.indices, b.input_ids, b.attention_mask, b.tokens)
        for b in batches(seqs, batch_size, pad_id, order=mine)
    ]
    n_tokens = sum(b.tokens for b in work)

    # --- before the first layer: embedding, masks, position embeddings ------------------------
    _load_tensors(model, reader, plan.prefix, load_config_, fmt)
    prefix_modules = [m for n, m in text_model.named_children() if m is not layers]
    for name, child in text_model.named_children():
        if child is not layers:
            where = f"{text_path}.{name}".lstrip(".")
            _materialize_buffers(model, child, where, device)
            _check_loaded(child, where, "the text model outside its layers")
    for name, p in text_model.named_parameters(recurse=False):
        if p.is_meta:
            raise UserError(f"the checkpoint has no tensor for '{text_path}.{name}'", "check the model")
    extra = 0
    for batch in work:
        extra = _capture(text_model, layers, last, batch, device)
    for child in prefix_modules:
        _free(child)

    # --- layer by layer -----------------------------------------------------------------------
    bar = _Progress(progress and info.rank == 0, "calibrating (sequential)", n_tokens * (last + 1))
    spent = dict.fromkeys(("read", "wait", "convert", "compute"), 0.0)
    prefetch = _Prefetch(reader) if PREFETCH else None
    pending = prefetch.submit(plan.layers[0]) if prefetch is not None else None
    try:
        for i in range(last + 1):
            layer = layers[i]
            experts_paths = [b.experts_path for b in blocks if b.layer == i]
            t0 = time.perf_counter()
            tensors = pending.result() if pending is not None else None
            pending = None  # the future would keep the layer's bytes alive
            t1 = time.perf_counter()
            _load_tensors(model, reader, plan.layers[i], load_config_, fmt, experts_paths, tensors)
            del tensors  # what the model keeps, it holds itself
            # one layer ahead: read i+1 while i computes, when the host has room for both
            if prefetch is not None and i < last and room_to_prefetch(_stored_bytes(reader, plan.layers[i + 1])):
                pending = prefetch.submit(plan.layers[i + 1])
            t2 = time.perf_counter()
            spent["wait"] += t1 - t0
            spent["convert"] += t2 - t1
            _materialize_buffers(model, layer, f"{lpath}.{i}", device)
            _check_loaded(layer, f"{lpath}.{i}", f"layer {i}")
            mine_blocks = [b for b in blocks if b.layer == i]
            init_routers_after_load(
                model, [b.router(model) for b in mine_blocks if b.adapter is not None and b.adapter.init_after_load]
            )
            with patch_moe(model, mine_blocks, observer=acc.observe, observer_keeps_rows=False) as session:
                for batch in work:
                    args, kwargs = _with_carried(batch.inputs.pop(i), batch.carried)
                    mask = batch.mask.to(device)
                    session.token_mask = mask.reshape(-1).bool()
                    acc.set_batch(batch.indices, mask)
                    out = layer(batch.hidden.to(device), *_to(args, device), **_to(kwargs, device))
                    if isinstance(out, (tuple, list)):
                        batch.carried = _to(tuple(out[1 : 1 + extra]), torch.device("cpu")) if i < last else ()
                        out = out[0]
                    batch.hidden = out.to("cpu") if i < last else None
                    bar.advance(batch.tokens)
            spent["compute"] += time.perf_counter() - t2
            _free(layer)
    finally:
        bar.close()
        if prefetch is not None:
            prefetch.close()
            spent["read"] = prefetch.seconds
    if timings is not None:
        timings.update(spent)
    acc.reduce()
    return acc.tensors()
