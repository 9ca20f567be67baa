"""moeprune: task-specific expert pruning for Mixture-of-Experts LLMs.

Data flow: data -> calibrate -> profile -> score -> plan -> surgery/checkpoint -> evaluate/report.
Architecture knowledge lives in :mod:`moeprune.arch` and nowhere else.

The Python API is :mod:`moeprune.api` (``profile``, ``plan``, ``prune``, ``evaluate``, ``oneshot``;
docs/api.md); the ``moeprune`` commands are thin shells around it.
``moeprune.load(path)`` loads any checkpoint moeprune writes (ragged and novice ones included);
``moeprune.AdaptiveMoE.from_library(model, library)`` serves a pattern library (PreMoe TAER).
"""

__version__ = "0.1.0"

from .load import load  # noqa: E402 - light: torch and transformers are imported on call

__all__ = ["AdaptiveMoE", "__version__", "api", "load"]


def __getattr__(name: str):
    if name == "AdaptiveMoE":  # imported on first use: the package itself stays light
        from .adaptive import AdaptiveMoE

        return AdaptiveMoE
    if name == "api":
        import importlib

        return importlib.import_module(".api", __name__)
    raise AttributeError(f"module 'moeprune' has no attribute {name!r}")
