"""Loading a model and its tokenizer for evaluation (local directory or a hub id in the local cache).

Self-contained on purpose; nothing is ever downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moeprune.device import DTYPES, resolve_device, resolve_dtype
from moeprune.errors import UserError

__all__ = ["DTYPES", "load_model_and_tokenizer", "resolve_device", "resolve_model_path", "torch_dtype"]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def torch_dtype(dtype: str) -> Any:
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}'", "use float32, bfloat16 or float16")
    return table[dtype]


def resolve_model_path(model: str) -> Path:
    """A local model directory for ``model`` (a path, or a hub id already in the local HF cache)."""
    if not model or not model.strip():
        raise UserError("no model given", "pass a local model directory or a cached hub id")
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"model path '{model}' is a file, not a directory",
                "pass the directory that holds config.json",
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"model directory '{model}' has no config.json", "pass a transformers model directory"
            )
        return path
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path or not _HUB_ID.match(model):
        raise UserError(
            f"model path '{model}' does not exist", "check the path, or pass a hub id from the local cache"
        )
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(model, local_files_only=True))
    except Exception:
        raise UserError(
            f"model '{model}' is not a local directory and is not in the local Hugging Face cache",
            f"download it first with `hf download {model}` or pass a local path",
        ) from None
    if not (snapshot / "config.json").is_file():
        raise UserError(
            f"the cached snapshot of '{model}' has no config.json",
            f"re-download it with `hf download {model}`",
        )
    return snapshot


def _raw_config(path: Path) -> dict[str, Any] | None:
    """``config.json`` as a dict for the auto dtype's width; None where it is not one (the load
    that follows names the problem)."""
    from moeprune.modelio import read_raw_config

    try:
        return read_raw_config(path)
    except UserError:
        return None


def load_model_and_tokenizer(model: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """Load a causal LM (eval mode, on ``device``) and its tokenizer; never downloads."""
    from moeprune.load import check_finite, from_pretrained
    from moeprune.modelio import load_tokenizer

    path = resolve_model_path(model)
    dev = resolve_device(device)
    dt = torch_dtype(resolve_dtype(dtype, dev, _raw_config(path)))
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load the tokenizer of '{model}': {str(exc).strip().splitlines()[0][:200]}",
            "the model directory needs its tokenizer files",
        ) from None
    try:
        lm = from_pretrained(path, dtype=dt, local_files_only=True)  # ragged/novice: moeprune.load
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot load '{model}' as a causal language model: {str(exc).strip().splitlines()[0][:200]}",
            "pass a transformers causal-LM checkpoint",
        ) from None
    check_finite(lm, model)  # scores of a NaN model are NaN, not an answer
    lm.to(dev)
    lm.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer
