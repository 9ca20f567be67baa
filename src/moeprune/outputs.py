"""Writing an output folder all at once: built in a temp folder beside it, then renamed into place."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_dir_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temp folder beside ``out``, then put it in place of ``out``.

    On any error or interrupt the temp folder is removed and an existing ``out`` is left as it was.
    """
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)  # --force, or an empty folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            with contextlib.suppress(OSError):
                os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
