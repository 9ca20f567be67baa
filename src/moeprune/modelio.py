"""Finding and opening models: local directories and hub ids present in the local cache.

moeprune never downloads at run time. A hub id works only when its snapshot is already in the
local Hugging Face cache; otherwise the error says how to get it.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import read_json

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(model: str) -> bool:
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "~"))


def resolve_model_dir(model: str) -> Path:
    """A local directory holding the model's config.json (resolving cached hub ids)."""
    if not model or not model.strip():
        raise UserError("no model given", "pass a local model directory or a cached hub id")
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file():
            raise UserError(
                f"'{model}' is a file, not a model directory", "pass the directory holding config.json"
            )
        if not (path / "config.json").is_file():
            raise UserError(f"'{model}' has no config.json", "pass a transformers model directory")
        return path
    if not _is_hub_id(model):
        raise UserError(
            f"model path '{model}' does not exist", "check the path, or pass a cached hub id (org/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(model, local_files_only=True)
    except Exception:
        raise UserError(
            f"'{model}' is neither a local directory nor a hub id in the local cache (moeprune never downloads)",
            f"download it first with `hf download {model}` or pass a local path",
        ) from None
    snap = Path(snapshot)
    if not (snap / "config.json").is_file():
        raise UserError(
            f"cached snapshot of '{model}' has no config.json", "re-download it with `hf download`"
        )
    return snap


def load_config(model: str) -> Any:
    """The model's config (no weights), with a clear error for anything that is not a transformers model."""
    from transformers import AutoConfig

    path = resolve_model_dir(model)
    raw = read_raw_config(path)
    from .remote import base_config, base_model_type

    try:
        if base_model_type(raw) is not None:  # a ragged / novice checkpoint renamed by moeprune
            return base_config(path, raw)
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"transformers cannot read the config of '{model}' (model_type '{raw['model_type']}'): {str(exc).splitlines()[0]}",
            "upgrade transformers or check the model",
        ) from None


def read_raw_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of the model directory ``path`` as a dict, its model type and counts
    checked (what :func:`load_config` checks before transformers reads it)."""
    raw = read_json(path / "config.json", "config", "fix or re-download it")
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise UserError(f"{path / 'config.json'} has no model_type", "pass a transformers model directory")
    _check_counts(raw, path / "config.json")
    return raw


# Sizes and counts that transformers' configs share: a model is built from them, so a string, a
# fraction or a negative number must stop here (torch would raise deep inside, or build nonsense).
_POSITIVE = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_attention_heads",
    "vocab_size",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_topk",
)
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk")
_NON_NEGATIVE = ("num_key_value_heads", "n_shared_experts", "num_shared_experts", "n_group", "topk_group")
# Counts that size the model's structure (modules built one by one, even on the meta device):
# far above any real model (the largest have ~100 layers and a few hundred experts), so that a
# config claiming 10**9 layers is one line instead of a hang building them.
_AT_MOST = {"num_hidden_layers": 1 << 14, **dict.fromkeys((*_EXPERTS, *_TOP_K), 1 << 16)}


def _check_counts(raw: dict[str, Any], where: Path) -> None:
    """The count fields of ``raw`` (and of its ``text_config``) are whole numbers in range (or
    non-empty lists of them, one per layer)."""
    for section in (raw, raw.get("text_config")):
        if not isinstance(section, dict):
            continue
        for name in (*_POSITIVE, *_NON_NEGATIVE):
            value = section.get(name)
            if value is None:
                continue
            low = 1 if name in _POSITIVE else 0
            values = value if isinstance(value, list) and value else [value]  # per-layer lists exist
            if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
                raise UserError(
                    f"{where}: '{name}' is {json.dumps(value)[:40]}, not a whole number >= {low}",
                    "fix or re-download the config",
                )
            high = _AT_MOST.get(name)
            if high is not None and max(values) > high:
                raise UserError(
                    f"{where}: '{name}' is {max(values)}, more than any model has (at most {high})",
                    "fix or re-download the config",
                )
        experts = next((section[n] for n in _EXPERTS if isinstance(section.get(n), int)), None)
        top_k = next((section[n] for n in _TOP_K if isinstance(section.get(n), int)), None)
        if experts is not None and top_k is not None and top_k > experts:
            raise UserError(
                f"{where}: {top_k} experts active per token, more than the {experts} experts per layer",
                "fix or re-download the config",
            )


def load_tokenizer(path: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``. A checkpoint whose model type
    moeprune renamed (:mod:`moeprune.remote`) gets its stock config passed: otherwise transformers
    reads the config itself, finds custom code and asks on the terminal whether to run it."""
    from transformers import AutoTokenizer

    from .remote import base_model_type

    kwargs: dict[str, Any] = {"local_files_only": True}
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = None
        if isinstance(raw, dict) and base_model_type(raw) is not None:
            kwargs["config"] = load_config(str(path))
    return AutoTokenizer.from_pretrained(path, **kwargs)


def quantization_method(config: Any) -> str | None:
    """The checkpoint's quantization method (``fp8``, ``mxfp4``, ...), None when not quantized."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method or "?")


def build_on_meta(config: Any):
    """Instantiate the causal LM on the meta device: structure and shapes, no memory, no weights.
    A multimodal wrapper's checkpoint is built as its stock wrapper class (:mod:`.arch.wrappers`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .arch.wrappers import wrapper_class

    wrapper = wrapper_class(config)
    try:
        with torch.device("meta"):
            if wrapper is not None:
                return wrapper._from_config(config)
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UserError(
            f"model type '{config.model_type}' has no causal-LM class in transformers ({str(exc).splitlines()[0][:120]})",
            "moeprune works on causal language models",
        ) from None


# Set by `moeprune profile` run as a process of its own (cli.OWNS_PROCESS): what a paused block
# allocated (modules, the one model) lives until exit, so it is frozen (never walked by a
# collection again) rather than collected. Off elsewhere: a loaded model sits in reference cycles,
# so a frozen model that is dropped (a command loading several, a library caller) would never be freed.
FREEZE_AFTER_PAUSE = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (restored after, even on error). Importing torch and
    transformers and loading a model (which imports its modeling code) allocate ~400k objects that
    live until the model is dropped; each full collection the allocations trigger walks all of
    them (the testbed's `profile`: 6 full collections, ~1 s). Paused, they are walked once, after
    (the collection that follows frees what the block left as cyclic garbage), or never, frozen,
    with :data:`FREEZE_AFTER_PAUSE` (a load leaves ~13k such objects, no measurable memory)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if FREEZE_AFTER_PAUSE:
            gc.freeze()
        if was_on:
            gc.enable()


def load_model(
    model: str, dtype: str = "float32", device: str = "cpu", experts_implementation: str | None = None
):
    """Load a causal LM and its tokenizer from a local directory or cached hub id."""
    from .load import from_pretrained

    path = resolve_model_dir(model)
    config = load_config(str(path))  # clear errors for broken configs before transformers' own
    from .device import resolve_dtype

    torch_dtype = parse_dtype(resolve_dtype(dtype, device, config))
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    if device not in ("cpu", ""):
        kwargs["device_map"] = device
    with gc_paused():
        lm = from_pretrained(path, **kwargs).eval()  # ragged / novice checkpoints: moeprune.load
        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError):
            tok = None
    return lm, tok


def parse_dtype(dtype: str):
    import torch

    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}'", "use float32, bfloat16 or float16")
    return table[dtype]
