"""``--device`` and ``--dtype``: one meaning for every command and API function.

``auto`` device: cuda when available, else cpu. ``auto`` dtype: bfloat16 on CUDA, float32 on CPU
(CPU kernels are fastest and exact in float32; on a GPU 16-bit halves the memory, as vLLM and
lm-eval do). No torch import at module level: the CLI reads the help texts before any heavy import.
"""

from __future__ import annotations

import os
import re

from .errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda if available, else cpu)."
DTYPE_HELP = "float32, bfloat16, float16 or auto (bfloat16 on CUDA, else float32)."


def check_device(device: str) -> None:
    """Reject a --device that is not cpu, cuda, cuda:N or auto (by name: no torch import)."""
    if device not in ("cpu", "cuda", "auto") and not re.fullmatch(r"cuda:\d+", device):
        raise UserError(f"unknown device '{device}'", "use --device cpu, cuda, cuda:N or auto")


def check_dtype(dtype: str) -> str:
    """The canonical name of a --dtype (float32, bfloat16, float16 or auto; bf16/fp16/fp32 too)."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in (*DTYPES, "auto"):
        raise UserError(f"unknown dtype '{dtype}'", "use --dtype float32, bfloat16, float16 or auto")
    return name


def resolve_device(device: str) -> str:
    """cpu, cuda, cuda:N or auto -> a torch device string (``cuda`` under torchrun -> this rank's GPU)."""
    import torch

    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' requested but CUDA is not available", "use --device cpu or auto")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """A --dtype for a resolved ``device``: auto -> bfloat16 on CUDA, float32 elsewhere."""
    name = check_dtype(dtype)
    if name == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return name
