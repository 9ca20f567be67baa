"""`moeprune inspect`: config-only summaries, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from _cli import run_cli
from moeprune.arch import ARCH_TABLE, find_moe_blocks
from moeprune.testing.tiny import buildable_types, tiny_config, tiny_model

SUPPORTED = [t for t in buildable_types() if t in ARCH_TABLE]


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_inspect_reports_the_right_counts(model_type, tmp_path, capsys):
    tiny_config(model_type).save_pretrained(tmp_path)  # config only: inspect never reads weights
    model = tiny_model(model_type)
    blocks = find_moe_blocks(model)
    code, out, err = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model_type"] == model.config.get_text_config().model_type
    assert report["num_moe_layers"] == len(blocks)
    assert report["moe_layers"] == [b.layer for b in blocks]
    assert report["num_experts"] == blocks[0].num_experts
    assert report["top_k"] == blocks[0].top_k
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for b in blocks for p in b.experts(model).parameters())
    assert report["routed_expert_params"] == routed
    half = next(k for k in report["keep"] if k["fraction"] == 0.5)
    assert half["params"] == report["total_params"] - routed + routed // 2


def test_inspect_table_and_size_of_a_large_config(tmp_path, capsys):
    """A DeepSeek-V3-sized config is summarised instantly from the config alone (meta device)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("deepseek_v3")  # defaults are the 671B model's shapes
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["num_experts"] == 256 and report["top_k"] == 8
    assert report["num_moe_layers"] == cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert 600e9 < report["total_params"] < 700e9
    assert report["total_bytes"] == 2 * report["total_params"]
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 0 and "256" in out and "12.5%" in out


def _one_line_error(capsys, *args: str) -> str:
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeprune: error:"), err
    assert "Traceback" not in err + out
    return lines[0]


def test_missing_path(capsys, tmp_path):
    assert "does not exist" in _one_line_error(capsys, "inspect", str(tmp_path / "nope"))


def test_dense_model(capsys, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", num_hidden_layers=2).save_pretrained(tmp_path)
    assert "dense" in _one_line_error(capsys, "inspect", str(tmp_path))


def test_directory_without_config(capsys, tmp_path):
    assert "config.json" in _one_line_error(capsys, "inspect", str(tmp_path))


def test_hub_id_not_in_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _one_line_error(capsys, "inspect", "some-org/some-moe-model")
    assert "local cache" in line and "hf download" in line


def test_unsupported_moe_type(capsys, tmp_path, monkeypatch):
    import moeprune.arch.table as table

    cfg = tiny_config("qwen3_moe")
    cfg.save_pretrained(tmp_path)
    monkeypatch.setitem(table.UNSUPPORTED, "qwen3_moe", "for this test")
    monkeypatch.delitem(table.ARCH_TABLE, "qwen3_moe")
    assert "not supported" in _one_line_error(capsys, "inspect", str(tmp_path))


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "deepseek_v2", "qwen3_moe"])
def test_inspect_rows_are_keeps_that_plan_accepts(model_type, tmp_path, capsys):
    """Issue 12 §5: inspect showed a 12.5% row (max(top-k, E/8) experts) that plan then refused
    ("keep at least 2"). Each row is now what plan makes of that fraction, or says why it refuses."""
    from moeprune.errors import UserError
    from moeprune.plan import make_plan

    tiny_config(model_type).save_pretrained(tmp_path)
    spec = find_moe_blocks(tiny_model(model_type))[0]
    code, out, err = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    rows = json.loads(out)["keep"]
    scores = torch.rand(3, spec.num_experts, dtype=torch.float64)
    routing = {"n_group": max(1, spec.spec.n_group), "topk_group": max(1, spec.spec.topk_group)}
    for row in rows:
        try:
            plan = make_plan(
                scores, keep=row["fraction"], top_k=spec.top_k, group_score=spec.spec.group_score, **routing
            )
        except UserError as exc:
            assert row["refused"] == exc.problem and row["params"] is None
            continue
        assert row["refused"] is None and plan.kept_counts() == [row["experts_per_layer"]] * 3
    # 8 experts, top-2: 12.5% is one expert, fewer than the two active per token
    if model_type == "mixtral":
        eighth = next(r for r in rows if r["fraction"] == 0.125)
        assert "fewer than the 2 active" in eighth["refused"]
        code, out, err = run_cli(capsys, "inspect", str(tmp_path))
        assert code == 0 and "refused by `moeprune plan` at 12.5%" in out.replace("\n", " ")


@pytest.mark.parametrize(
    "damage, words",
    [
        ({"num_experts": 0}, "'num_experts' is 0, not a whole number >= 1"),
        ({"num_experts_per_tok": 16}, "16 experts active per token, more than the 8 experts"),
        (b'{"model_type": "qwen3_moe", "name": "\xff\xfe"}', "is not UTF-8 text"),
    ],
)
def test_inspect_hostile_configs_are_one_line(tmp_path, capsys, damage, words):
    """Issue 11 #11: zero experts (ZeroDivisionError), top-k above the experts and a config.json
    that is not UTF-8 each give one line from inspect."""
    tiny_config("qwen3_moe").save_pretrained(tmp_path)
    cfg = tmp_path / "config.json"
    if isinstance(damage, bytes):
        cfg.write_bytes(damage)
    else:
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **damage}))
    assert words in _one_line_error(capsys, "inspect", str(tmp_path))
