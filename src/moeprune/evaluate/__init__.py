"""Evaluation harness: perplexity, exact-match generation and multiple-choice tasks, plus a bridge
to lm-evaluation-harness.

Python API::

    from moeprune.evaluate import evaluate, load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("path/to/model")
    results = evaluate(model, tok, ["math=data/math.eval.jsonl", "prose.txt"], limit=100)

Task handling (:mod:`moeprune.evaluate.tasks`) needs no torch; the evaluators are imported lazily.
"""

from __future__ import annotations

from typing import Any

from moeprune.evaluate.tasks import KINDS, Task, load_task_file, parse_task_spec, resolve_tasks

__all__ = [
    "KINDS",
    "Task",
    "evaluate",
    "load_model_and_tokenizer",
    "load_task_file",
    "parse_task_spec",
    "resolve_tasks",
    "run_exact_match",
    "run_lm_eval",
    "run_multiple_choice",
    "run_perplexity",
]

_LAZY = {
    "evaluate": "moeprune.evaluate.runners",
    "run_exact_match": "moeprune.evaluate.runners",
    "run_multiple_choice": "moeprune.evaluate.runners",
    "run_perplexity": "moeprune.evaluate.runners",
    "load_model_and_tokenizer": "moeprune.evaluate.loading",
    "run_lm_eval": "moeprune.evaluate.lm_eval_bridge",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeprune.evaluate' has no attribute {name!r}")
