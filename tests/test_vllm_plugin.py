"""The vLLM plugin's config reading and entry point (vLLM itself: scripts/check_vllm.sh, opt-in)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from moeprune.vllm_plugin.layout import read_layout

ROOT = Path(__file__).resolve().parents[1]


def _config(**moeprune):
    return SimpleNamespace(moeprune={"format": "moeprune-checkpoint/1", **moeprune})


def test_ragged_and_novice_layouts_read():
    ragged = read_layout(_config(mode="remove", experts_per_layer={"1": 12, "2": 16}))
    assert ragged.mode == "remove" and ragged.experts_per_layer == {1: 12, 2: 16}
    novice = read_layout(
        _config(
            mode="novice",
            experts_per_layer={"1": 2},
            novice_experts={"1": [3, 0]},
            novice_storage="buffer",
            base_model_type="deepseek_v3",
        )
    )
    assert novice.novice_experts == {1: [0, 3]} and novice.base_model_type == "deepseek_v3"
    assert read_layout(SimpleNamespace()) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "novice", "novice_storage": "down_bias"}, "novice_storage"),
        ({"mode": "remove", "dead_experts": {"1": [3]}}, "stock"),
        ({"mode": "merge"}, "unknown mode"),
    ],
)
def test_unservable_layouts_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        read_layout(_config(**fields))


def test_entry_point_names_register():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+
    section = text.split('[project.entry-points."vllm.general_plugins"]\n', 1)[1].split("\n[", 1)[0]
    assert 'moeprune = "moeprune.vllm_plugin:register"' in section
    import moeprune.vllm_plugin as plugin  # importable without vLLM

    assert callable(plugin.register)
