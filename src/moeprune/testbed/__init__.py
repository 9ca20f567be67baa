"""The moeprune testbed: a small trained DeepSeek-V3-architecture MoE and its multi-domain data.

The model (``model/``) and the data (``data/``) are produced by ``scripts/train_testbed.py``;
see :mod:`moeprune.testbed.corpus` for the domains and the evaluation protocol.
"""

from __future__ import annotations

from pathlib import Path

from moeprune.testbed.corpus import DOMAINS, TASKS, TEXT_DOMAINS

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_DIR = PACKAGE_DIR / "model"
DATA_DIR = PACKAGE_DIR / "data"

__all__ = [
    "DATA_DIR",
    "DOMAINS",
    "MODEL_DIR",
    "PACKAGE_DIR",
    "TASKS",
    "TEXT_DOMAINS",
    "data_file",
    "testbed_path",
]


def testbed_path() -> Path:
    """Directory of the packaged testbed checkpoint (loadable with ``from_pretrained``)."""
    return MODEL_DIR


def data_file(domain: str, split: str) -> Path:
    """Path of ``<domain>.<split>.jsonl`` (``split`` is ``"calib"`` or ``"eval"``)."""
    if domain not in DOMAINS:
        raise KeyError(f"unknown testbed domain {domain!r}; known: {', '.join(DOMAINS)}")
    if split not in ("calib", "eval"):
        raise KeyError(f"unknown split {split!r}; use 'calib' or 'eval'")
    return DATA_DIR / f"{domain}.{split}.jsonl"
