"""Test helpers: tiny random models of every MoE causal-LM type in transformers."""
