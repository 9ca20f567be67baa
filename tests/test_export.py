"""`moeprune export --uniform`: the stock uniform checkpoint nearest to a ragged or novice prune
(tiny random models, float32): one count per layer, each layer's own top experts by the plan's
scores, a checkpoint stock transformers loads that equals the original model with the other
experts masked out of routing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _cli import assert_user_error, run_cli
from moeprune import api
from moeprune.arch import find_moe_blocks, kept_controls, patch_moe
from moeprune.export import nearest_count
from moeprune.plan import Plan
from moeprune.score import score
from moeprune.testing import tiny


def _calib(path: Path, word: str) -> Path:
    path.write_text("".join(json.dumps({"text": f"{word} {i} " * 6}) + "\n" for i in range(8)))
    return path


def _saved(root: Path, model_type: str) -> tuple[Path, Path, Path]:
    """The tiny model (3 layers) saved with a tokenizer, and two calibration files."""
    d = root / model_type
    model = tiny.tiny_model(model_type, num_hidden_layers=3)
    model.save_pretrained(d)
    tiny.byte_tokenizer().save_pretrained(d)
    return (
        d,
        _calib(root / f"{model_type}-a.jsonl", "alpha beta"),
        _calib(root / f"{model_type}-b.jsonl", "7+5="),
    )


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir, data_a, data_b = _saved(root, "qwen3_moe")
    prof = root / "a.profile.safetensors"
    api.profile(model_dir, [data_a], out=prof)
    other = root / "b.profile.safetensors"
    api.profile(model_dir, [data_b], out=other)
    return root, model_dir, prof, other


def _top(scores: torch.Tensor, row: int, k: int, groups: int = 1) -> list[int]:
    """The k best experts of a score row (ties: the lower id), k / groups from each equal group."""
    n = scores.shape[1]
    size = n // groups
    best = []
    for g in range(groups):
        ids = sorted(range(g * size, (g + 1) * size), key=lambda i: (-float(scores[row, i]), i))
        best += ids[: k // groups]
    return sorted(best)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _assert_masked_equal(model_dir: Path, out: Path, kept: dict[int, list[int]]) -> None:
    """``out`` loads with stock transformers (no missing/unexpected/mismatched tensor) and gives
    the logits of the original with only ``kept`` routed (float32)."""
    from transformers import AutoModelForCausalLM

    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), (
        info
    )
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    blocks = find_moe_blocks(original)
    x = _ids(original.config.vocab_size)
    with torch.no_grad():
        with patch_moe(original, blocks, controls=kept_controls(blocks, kept, None)):
            want = original(x, use_cache=False).logits
        got = pruned.eval()(x, use_cache=False).logits
    assert [b.num_experts for b in find_moe_blocks(pruned)] == [len(kept[b.layer]) for b in blocks]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_ragged_checkpoint_exports_its_nearest_uniform_prune(qwen, tmp_path, capsys):
    root, model_dir, prof, _ = qwen
    ragged = api.plan(prof, "frequency", 4, scope="global")
    assert len(set(ragged.kept_counts())) > 1, ragged.kept_counts()  # really ragged
    ckpt = tmp_path / "ragged"
    api.prune(model_dir, ragged, ckpt, profile=prof)

    rc, out, err = run_cli(capsys, "export", ckpt, "--uniform", "--out", tmp_path / "uniform")
    assert rc == 0, err
    assert "-> 4 in each of 3 layers" in out and "wrote" in err

    plan = Plan.load(tmp_path / "uniform" / "plan.json")
    assert plan.kept_counts() == [4, 4, 4]
    scores = score(api.load_profile(prof), "frequency")
    for row, layer in enumerate(plan.layers):
        assert plan.kept[layer] == _top(scores, row, 4), layer
    # the same plan `moeprune plan --scope layer` makes, and where it came from is recorded
    assert plan.kept == api.plan(prof, "frequency", 4, scope="layer").kept
    assert plan.settings["uniform_of"]["kept_counts"] == {
        str(layer): n for layer, n in zip(ragged.layers, ragged.kept_counts(), strict=True)
    }
    config = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["num_experts"] == 4
    _assert_masked_equal(model_dir, tmp_path / "uniform", plan.kept)


def test_novice_plan_below_top_k_exports_top_k_experts(qwen, tmp_path):
    _, model_dir, prof, _ = qwen
    novice = api.plan(prof, "mone", 1, scope="global", router="unchanged")  # 1 per layer < top-k 2
    plan_file = tmp_path / "novice.json"
    novice.save(plan_file)
    done = api.export_uniform(plan_file, tmp_path / "uniform")
    plan = done.uniform.plan
    assert done.uniform.mean_kept == 1.0 and plan.kept_counts() == [2, 2, 2]  # the nearest removal allows
    scores = score(api.load_profile(prof), "mone")
    assert all(plan.kept[layer] == _top(scores, row, 2) for row, layer in enumerate(plan.layers))
    assert done.result.stock
    _assert_masked_equal(model_dir, tmp_path / "uniform", plan.kept)


def test_mixed_domain_plan_uses_all_its_profiles(qwen, tmp_path):
    _, model_dir, prof, other = qwen
    ragged = api.plan([prof, other], "easyep", 5, scope="global")
    plan_file = tmp_path / "mixed.json"
    ragged.save(plan_file)
    done = api.export_uniform(plan_file, tmp_path / "uniform")
    assert done.uniform.plan.kept == api.plan([prof, other], "easyep", 5, scope="layer").kept
    assert done.uniform.plan.kept_counts() == [5, 5, 5]


def test_grouped_router_keeps_equal_groups(tmp_path):
    model_dir, data_a, _ = _saved(tmp_path, "deepseek_v3")
    prof = tmp_path / "p.profile.safetensors"
    api.profile(model_dir, [data_a], out=prof)
    # a novice plan ignores the 2 routing groups: 3 experts per layer, any group
    novice = api.plan(prof, "gate", 3, scope="global", router="unchanged")
    ckpt = tmp_path / "novice"
    api.prune(model_dir, novice, ckpt, mode="novice", profile=prof)
    done = api.export_uniform(ckpt, tmp_path / "uniform")
    plan = done.uniform.plan
    n_moe = len(plan.layers)
    # 2 equal groups, a token's top-2 from its 1 best group: removal accepts 4, 6 or 8 experts per
    # layer (equal groups of at least 2); the mean, 3, is refused and 4 is the nearest
    assert plan.kept_counts() == [4] * n_moe
    scores = score(api.load_profile(prof), "gate")
    assert all(plan.kept[layer] == _top(scores, row, 4, groups=2) for row, layer in enumerate(plan.layers))
    _assert_masked_equal(model_dir, tmp_path / "uniform", plan.kept)
    # a mean of 5 is refused: 4 and 6 are as near, and the larger one is taken
    five = Plan.from_json(
        {**novice.to_json(), "kept": {str(x): [0, 1, 2, 4, 5] for x in novice.layers}, "replaced": None}
    )
    assert nearest_count(five, api.load_profile(prof).meta) == (6, 5.0)


def _nothing_written(path: Path) -> bool:
    return not path.exists() and not any(p.name.startswith(path.name) for p in path.parent.iterdir())


def test_user_mistakes_are_one_line(qwen, tmp_path, capsys):
    root, model_dir, prof, other = qwen
    ragged = api.plan(prof, "frequency", 4, scope="global")
    plan_file = tmp_path / "ragged.json"
    ragged.save(plan_file)
    out = tmp_path / "uniform"

    rc, _, err = run_cli(capsys, "export", plan_file, "--out", out)
    assert_user_error(rc, err, "--uniform")
    # scores of another profile do not give the plan's kept experts
    rc, _, err = run_cli(capsys, "export", plan_file, "--uniform", "--out", out, "--profile", other)
    assert_user_error(rc, err, "does not reproduce", "--profile")
    # the recorded profile is gone
    moved = tmp_path / "moved.profile.safetensors"
    shutil.copy(prof, moved)
    gone = Plan.load(plan_file)
    gone.settings["profiles"][0]["path"] = str(tmp_path / "nowhere.profile.safetensors")
    gone.save(tmp_path / "gone.json")
    rc, _, err = run_cli(capsys, "export", tmp_path / "gone.json", "--uniform", "--out", out)
    assert_user_error(rc, err, "does not exist", "--profile")
    rc, _, err = run_cli(
        capsys, "export", tmp_path / "gone.json", "--uniform", "--out", out, "--profile", moved
    )
    assert rc == 0, err
    shutil.rmtree(out)
    # a folder that is not a pruned checkpoint, and the wrong model
    rc, _, err = run_cli(capsys, "export", model_dir, "--uniform", "--out", out)
    assert_user_error(rc, err, "no plan.json")
    wrong = tmp_path / "mixtral"
    tiny.tiny_model("mixtral", num_hidden_layers=3).save_pretrained(wrong)
    rc, _, err = run_cli(capsys, "export", plan_file, "--uniform", "--out", out, "--model", wrong)
    assert_user_error(rc, err, "plan was made for")
    # the output is never the pruned checkpoint it reads
    ckpt = tmp_path / "ckpt"
    api.prune(model_dir, ragged, ckpt, profile=prof)
    rc, _, err = run_cli(capsys, "export", ckpt, "--uniform", "--out", ckpt, "--force")
    assert_user_error(rc, err, "pruned checkpoint")
    assert _nothing_written(out)
