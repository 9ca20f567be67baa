"""Checks of the evaluation options that ``moeprune eval``, ``moeprune compare`` and
:func:`moeprune.evaluate.evaluate` share, so that all three word a bad value the same way.

Needs no torch: the commands call these before loading anything heavy.
"""

from __future__ import annotations

from moeprune.device import check_device, check_dtype  # no torch
from moeprune.errors import UserError

__all__ = ["check_device_and_dtype", "check_run_options"]


def check_run_options(*, limit: int | None, batch_size: int, max_new_tokens: int, max_length: int) -> None:
    """Raise a :class:`UserError` naming the first of these options that is out of range."""
    if limit is not None and limit <= 0:
        raise UserError(
            f"--limit must be a positive number of records, got {limit}", "pass --limit 1 or more"
        )
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}", "pass --batch-size 1 or more")
    if max_new_tokens <= 0:
        raise UserError(
            f"--max-new-tokens must be positive, got {max_new_tokens}", "pass --max-new-tokens 1 or more"
        )
    # A perplexity document needs one token to condition on and one to predict.
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}", "pass a larger --max-length")


def check_device_and_dtype(device: str, dtype: str) -> None:
    """Reject an unknown --device or --dtype by name only (whether CUDA is there is checked on load)."""
    check_device(device)
    check_dtype(dtype)
