"""``--device`` and ``--dtype``: one meaning for every command and API function.

``auto`` device: cuda when available, else cpu. ``auto`` dtype: the fastest dtype the device runs
well: bfloat16 on CUDA (16-bit halves the memory, as vLLM and lm-eval do) and on CPUs with bf16
matrix units (AMX-bf16 or AVX512-bf16: on a 2-core Xeon with AMX, bf16 matmuls run ~8x faster than
float32) for models of hidden size >= :data:`CPU_BF16_MIN_HIDDEN`; float32 on other CPUs (without
those units bf16 is emulated and 2-4x slower) and for narrower models (their matmuls are too small
for the units, the conversions around them dominate, and such models are small anyway). Statistics are
accumulated in float64 whatever the compute dtype (:mod:`moeprune.calibrate`); docs/benchmarks.md
measures what bf16 changes in the rankings. ``MOEPRUNE_CPU_BF16=0`` (or ``1``) overrides the CPU's
bf16-unit detection (the width rule still applies); the test suite sets 0 so that its exactness
checks run in float32. No torch import at
module level: the CLI reads the help texts before any heavy import.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from .errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}

DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda if available, else cpu)."
DTYPE_HELP = (
    "float32, bfloat16, float16 or auto (bfloat16 on CUDA, and on CPUs with AMX/AVX512-bf16 for models of "
    "hidden size >= 1024; else float32)."
)


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


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_BF16_ENV = "MOEPRUNE_CPU_BF16"


def cpu_flags_have_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text lists a bf16 matrix unit (AMX-bf16 or AVX512-bf16) on its flags line."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return any(f in CPU_BF16_FLAGS for f in line.split(":", 1)[1].split())
    return False


@functools.cache
def _cpuinfo_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_flags_have_bf16(f.read())
    except OSError:  # not Linux: no detection, float32 (always correct, maybe slower)
        return False


def cpu_runs_bf16_fast() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (``MOEPRUNE_CPU_BF16`` = 0/1 overrides)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpuinfo_bf16()


# Below this hidden size a CPU with bf16 units still runs the forward faster in float32: with
# hidden 128 (the testbed) the stock forward took 1.14 s in float32 and 1.88 s in bfloat16 on a
# Xeon with AMX, while at hidden 1024 bfloat16 was the fastest (docs/benchmarks.md). Models that
# narrow are small, so bfloat16's other gain, memory, hardly counts there.
CPU_BF16_MIN_HIDDEN = 1024


def model_width(config: Any) -> int | None:
    """The hidden size of a transformers config or a ``config.json`` dict (the text model's for
    multimodal ones), or None where it names none."""
    if isinstance(config, dict):
        text = config.get("text_config")
        width = config.get("hidden_size", text.get("hidden_size") if isinstance(text, dict) else None)
    elif config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        width = getattr(text, "hidden_size", None)
    else:
        width = None
    return width if isinstance(width, int) and not isinstance(width, bool) and width > 0 else None


def resolve_dtype(dtype: str, device: str, config: Any = None) -> str:
    """A --dtype for a resolved ``device`` and the model's ``config`` (a transformers config or a
    ``config.json`` dict; None: width unknown): auto ->
    bfloat16 on CUDA, and on CPUs with bf16 units (:func:`cpu_runs_bf16_fast`) unless the model is
    narrower than :data:`CPU_BF16_MIN_HIDDEN`; float32 elsewhere."""
    name = check_dtype(dtype)
    if name == "auto":
        if str(device).startswith("cuda"):
            return "bfloat16"
        if str(device).startswith("cpu") and cpu_runs_bf16_fast():
            width = model_width(config)
            return "float32" if width is not None and width < CPU_BF16_MIN_HIDDEN else "bfloat16"
        return "float32"
    return name
