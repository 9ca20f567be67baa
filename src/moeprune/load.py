"""``moeprune.load(path)``: load any checkpoint moeprune writes, strictly.

Stock transformers loads the checkpoints of uniform Remove surgery and of ``--pad-uniform``. Two
kinds need more than one config count can say, and record it in ``config.moeprune``
(:class:`moeprune.arch.pruned.PrunedLayout`):

- ragged checkpoints (a different number of experts per MoE layer);
- MoNE novice checkpoints (kept experts' weights plus one constant vector per replaced expert).

For those, the model class is subclassed once (same name and module, so transformers applies the
same weight conversions, attention and experts implementations); its ``__init__`` builds the model
from the config as usual (on the meta device inside ``from_pretrained``) and then reshapes every
MoE layer with :func:`moeprune.arch.pruned.apply_layout`. ``from_pretrained`` then loads the
safetensors into correctly sized tensors, whatever the layout on disk (fused or one key per expert).
Every load is strict: a missing, unexpected or mis-sized tensor is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .errors import UserError

__all__ = [
    "aux_loss_off",
    "check_finite",
    "disable_aux_loss",
    "from_pretrained",
    "load",
    "needs_moeprune_load",
    "pruned_model_class",
]

# from_pretrained's own keyword arguments (transformers 5.x pops them before the rest goes to the
# config); any other keyword that names a config attribute updates the config, as with stock
# from_pretrained(path, output_router_logits=False).
_LOADING_KWARGS = frozenset(
    {
        "adapter_kwargs", "adapter_name", "allow_all_kernels", "attn_implementation", "cache_dir",
        "device_map", "device_mesh", "distributed_config", "dtype", "experts_implementation",
        "force_download", "generation_config", "gguf_file", "kernel_config", "kernels_mode",
        "key_mapping", "local_files_only", "max_memory", "offload_buffers", "offload_folder",
        "output_loading_info", "proxies", "quantization_config", "revision", "state_dict",
        "subfolder", "token", "torch_dtype", "tp_plan", "tp_size", "tqdm_class", "trust_remote_code",
        "use_kernels", "use_safetensors", "variant", "weights_only",
    }
)  # fmt: skip


def _configs(config: Any) -> list[Any]:
    """``config`` and its nested sub-configs (the text config of a multimodal model)."""
    found = [config]
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            found += _configs(sub)
    return found


def disable_aux_loss(model: Any) -> Any:
    """Set ``output_router_logits`` False on every (sub-)config of ``model``; returns ``model``.

    Checkpoints saved after training with the router's auxiliary loss say
    ``output_router_logits: true``; transformers then computes the load-balancing loss in every
    forward, which moeprune never needs: it fails when a decoding step's attention mask is longer
    than its one new token, and on ragged checkpoints (router widths differ per layer) always."""
    for cfg in _configs(model.config):
        if getattr(cfg, "output_router_logits", False):
            cfg.output_router_logits = False
    return model


@contextmanager
def aux_loss_off(model: Any) -> Iterator[Any]:
    """:func:`disable_aux_loss` for the duration of a ``with`` block (for a model moeprune was
    given rather than loaded itself: its config is restored afterwards)."""
    before = [
        (cfg, cfg.output_router_logits)
        for cfg in _configs(model.config)
        if hasattr(cfg, "output_router_logits")
    ]
    disable_aux_loss(model)
    try:
        yield model
    finally:
        for cfg, value in before:
            cfg.output_router_logits = value


_SUBCLASSES: dict[type, type] = {}


def pruned_model_class(cls: type) -> type:
    """``cls`` whose instances are reshaped after ``__init__`` by the config's ``moeprune`` layout."""
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]
    from .arch.pruned import PrunedLayout, apply_layout

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        layout = PrunedLayout.of_config(config)
        if layout is not None:
            apply_layout(self, layout)

    # Same name, qualname and module: transformers looks up weight conversions by class name and
    # treats classes from outside its package as custom code (no conversions).
    sub = type(
        cls.__name__,
        (cls,),
        {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )
    _SUBCLASSES[cls] = sub
    return sub


def _causal_lm_class(config: Any) -> type:
    """The causal LM class of ``config``; the stock wrapper class of a multimodal checkpoint whose
    language model moeprune prunes (:mod:`moeprune.arch.wrappers`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .arch.wrappers import wrapper_class

    wrapper = wrapper_class(config)
    if wrapper is not None:
        return wrapper
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UserError(
            f"model type '{config.model_type}' has no causal-LM class in transformers",
            "moeprune works on causal language models",
        ) from None


def load(path: str | os.PathLike, **kwargs: Any):
    """Load the causal LM in ``path`` (a model directory or cached hub id), reshaping ragged and
    novice MoE layers as its ``config.moeprune`` says. ``kwargs`` go to ``from_pretrained``
    (``dtype``, ``device_map``, ``experts_implementation``, ...). Raises :class:`UserError` unless
    every tensor of the checkpoint loads into the model and every tensor of the model is loaded."""
    from .arch.pruned import CONFIG_KEY, PrunedLayout
    from .checkpoint import Checkpoint
    from .modelio import load_config, resolve_model_dir

    directory = resolve_model_dir(str(path))
    config = load_config(str(directory))
    ckpt = Checkpoint.open(directory)  # headers only: a truncated or corrupt file is one clear line
    if not getattr(config, "quantization_config", None):
        _check_float_storage(ckpt, directory)
    try:
        layout = PrunedLayout.of_config(config)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{directory / 'config.json'}: {exc}", "re-write it with `moeprune prune`") from None
    cls = _causal_lm_class(config)
    if layout is not None:
        cls = pruned_model_class(cls)
        if len(set(layout.experts_per_layer.values())) > 1:
            # transformers' load-balancing loss concatenates every layer's router logits, which
            # ragged widths cannot: a ragged model only runs without it (docs/surgery.md)
            for cfg in _configs(config):
                if getattr(cfg, "output_router_logits", False):
                    cfg.output_router_logits = False
    for key in [k for k in kwargs if k not in _LOADING_KWARGS and hasattr(config, k)]:
        setattr(config, key, kwargs.pop(key))  # config overrides, as stock from_pretrained takes them
    kwargs.setdefault("local_files_only", True)
    # transformers >= 5.2x swaps modules (RMSNorm, activations) for kernels it downloads from the
    # Hub on CUDA by default: a download at run time (refused offline or by the kernels' trust
    # check) and modules moeprune's exact statistics were not written against. Opt in explicitly.
    kwargs.setdefault("use_kernels", False)
    kwargs.pop("output_loading_info", None)
    from .quant import quant_format

    fmt = quant_format(config)  # an unsupported quantization method is one line here
    dequantize = fmt is not None and not stock_quantizer_runs(fmt, kwargs)
    try:
        with _bar_on_terminal_only():
            if dequantize:
                model, info = _load_dequantized(cls, directory, ckpt, config, fmt, kwargs)
            else:
                model, info = cls.from_pretrained(
                    directory, config=config, output_loading_info=True, **kwargs
                )
    except (RuntimeError, ValueError) as exc:
        if "mismatched_sizes" in str(exc):  # transformers' own text points at a report it logged
            raise UserError(
                f"cannot load '{directory}': some checkpoint tensors have other shapes than its "
                "config.json describes (experts, sizes)",
                "the config does not match the checkpoint: fix the config or re-download the model",
            ) from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = (
            f"the checkpoint does not match its config.{CONFIG_KEY}"
            if layout is not None
            else "if it is a ragged checkpoint written by another tool, it cannot be loaded"
        )
        raise UserError(f"cannot load '{directory}': {first}", hint) from None
    refuse_inexact(directory, {what: info.get(what) for what in _INEXACT})
    if fmt is None or dequantize:  # packed quantized shapes differ by design
        _check_shapes(model, model.config, layout, directory)
    if fmt is not None:
        how = "dequantized on load by moeprune" if dequantize else "kept quantized by transformers"
        model.moeprune_quantization = f"{fmt.label}: {how}"
    return model


def stock_quantizer_runs(fmt: Any, kwargs: dict[str, Any]) -> bool:
    """Whether transformers' own quantizer would run ``fmt`` quantized for this load: fp8 on a
    CUDA GPU of compute capability >= 8.9 with the ``kernels`` package (its fp8 matmuls are Hub
    kernels). Everywhere else transformers dequantizes on load itself, with the block size derived
    from the scale grid (wrong for partial edge blocks such as DeepSeek-V3's 576-row
    ``kv_a_proj_with_mqa``), so moeprune dequantizes instead (:func:`_load_dequantized`)."""
    import torch

    if fmt.method != "fp8" or not torch.cuda.is_available():
        return False
    device_map = kwargs.get("device_map")
    on_cuda = (isinstance(device_map, str) and device_map.startswith("cuda")) or (
        isinstance(device_map, torch.device) and device_map.type == "cuda"
    )
    if not on_cuda:
        return False
    from transformers.utils import is_kernels_available

    return torch.cuda.get_device_capability() >= (8, 9) and is_kernels_available()


def _load_dequantized(cls: type, directory: Any, ckpt: Any, config: Any, fmt: Any, kwargs: dict[str, Any]):
    """Load a quantized checkpoint as the float model it stands for: every tensor read, each
    quantized weight dequantized with its scales (:func:`moeprune.quant.dequantize_tensors`) and
    the result given to ``from_pretrained`` as a state dict of the unquantized model."""
    import copy

    import torch
    from safetensors import safe_open

    from .quant import check_quantized, dequantize_tensors

    dtype = kwargs.pop("dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    raw: dict[str, torch.Tensor] = {}
    for path in ckpt.shard_files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                raw[key] = fh.get_tensor(key)
    check_quantized(list(raw), fmt, directory)
    state = dequantize_tensors(raw, fmt, dtype)
    del raw
    plain = copy.deepcopy(config)
    del plain.quantization_config
    model, info = cls.from_pretrained(
        None, config=plain, state_dict=state, dtype=dtype, output_loading_info=True, **kwargs
    )
    model.name_or_path = model.config._name_or_path = str(directory)
    return model, info


@contextmanager
def _bar_on_terminal_only() -> Iterator[None]:
    """transformers' "Loading weights" bar only where a terminal redraws it: written to a file or
    pipe it stays as a line, and a refused load then printed two lines, not one."""
    import sys

    from transformers.utils import logging as hf_logging

    hide = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def _check_float_storage(ckpt: Any, directory: Any) -> None:
    """A checkpoint that is not quantized stores its weights as floats: an integer tensor would be
    cast on load without a word (old integer buffers that transformers ignores excepted)."""
    for key, info in ckpt.tensors.items():
        if info.dtype in ("U8", "I8", "I16", "U16", "I32", "U32") and not key.endswith(
            ("position_ids", "inv_freq")
        ):
            raise UserError(
                f"'{directory}': tensor '{key}' is stored as {info.dtype} in a checkpoint that is not quantized",
                "the checkpoint is corrupted or mislabelled: re-download or re-save the model",
            )


_INEXACT = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


def refuse_inexact(directory: Any, found: dict[str, Any]) -> None:
    """One line naming a few keys of each non-empty kind in ``found`` ({"missing_keys": [...],
    "unexpected_keys": [...], ...}): the check every loader of moeprune ends with (``load``, the
    layer-by-layer ``--offload sequential`` and ``AdaptiveMoE``)."""
    problems = []
    for what, keys in found.items():
        names = sorted(str(x) for x in keys or [])
        if names:
            problems.append(f"{len(names)} {what.replace('_', ' ')} (e.g. {', '.join(names[:3])})")
    if problems:
        raise UserError(
            f"'{directory}' does not load exactly: {'; '.join(problems)}",
            "its config.json does not match the checkpoint's tensors (layers, experts, sizes): "
            "fix the config or re-download / re-write the model",
        )


def expected_unexpected(model: Any, keys: Any) -> set[str]:
    """``keys`` without those the model's class declares harmless (transformers' own rules:
    ``_keys_to_ignore_on_load_unexpected``, e.g. DeepSeek-V3's multi-token-prediction layer)."""
    from types import SimpleNamespace

    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(keys))
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:
        adjust(info)
    return set(info.unexpected_keys)


def _check_shapes(model: Any, config: Any, layout: Any, directory: Any) -> None:
    """Every loaded tensor has the shape the config describes. transformers replaces a parameter
    by a converted checkpoint tensor of another shape without a word (a config claiming 16
    experts loads a checkpoint of 8 and runs as a model of 8), so compare with a meta build."""
    from .arch.pruned import apply_layout
    from .modelio import build_on_meta

    reference = build_on_meta(config)
    if layout is not None:
        apply_layout(reference, layout)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    for key, value in model.state_dict().items():
        if key in want and tuple(value.shape) != want[key]:
            raise UserError(
                f"'{directory}': checkpoint tensor for '{key}' has shape {list(value.shape)}, "
                f"its config.json describes {list(want[key])}",
                "the config does not match the checkpoint: fix the config or re-download the model",
            )


_CHUNK = 1 << 24  # elements checked at a time: a bounded temporary, whatever the tensor's size


def check_finite(model: Any, where: Any) -> None:
    """Every floating-point tensor of ``model`` is finite (NaN or Inf weights make every result
    NaN without an error); 8-bit floats and tensors left on the meta device are not checked."""
    import torch

    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.element_size() < 2 or t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK]
            if not bool(torch.isfinite(chunk).all()):
                bad = "NaN" if bool(torch.isnan(chunk).any()) else "an infinite value"
                raise UserError(
                    f"'{where}': weight '{name}' holds {bad}",
                    "the checkpoint is corrupt: re-download or re-write the model",
                )


def needs_moeprune_load(config: Any) -> bool:
    """True when stock ``from_pretrained`` cannot build this config's checkpoint (ragged or novice)."""
    from .arch.pruned import PrunedLayout

    try:
        layout = PrunedLayout.of_config(config)
    except (ValueError, TypeError):
        return False
    if layout is None:
        return False
    return layout.novices_in_buffer or len(set(layout.experts_per_layer.values())) > 1


def from_pretrained(path: str | os.PathLike, **kwargs: Any):
    """What moeprune's own commands load models with: :func:`load`, strict for every checkpoint
    (a config that claims more layers or experts than the weights hold would otherwise run with
    random weights, transformers' warning being silenced), and it reshapes ragged and novice ones;
    with the router's auxiliary loss off (:func:`disable_aux_loss`): moeprune only runs inference."""
    return disable_aux_loss(load(path, **kwargs))
