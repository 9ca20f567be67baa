"""moeprune: task-specific expert pruning for Mixture-of-Experts LLMs.

Data flow: data -> calibrate -> profile -> score -> plan -> surgery/checkpoint -> evaluate/report.
Architecture knowledge lives in :mod:`moeprune.arch` and nowhere else.
"""

__version__ = "0.1.0"
