"""Plans: per-layer and global budgets, group-limited routing, the plan file, and `moeprune plan`."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from _cli import assert_user_error, run_cli
from moeprune.errors import UserError
from moeprune.plan import Plan, experts_to_keep, make_plan, parse_keep, plan_summary
from moeprune.score import normalize_per_layer


@dataclass
class FakeProfile:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def rand_scores(n_layers: int, n_experts: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n_layers, n_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def group_counts(ids: list[int], n_group: int, size: int) -> list[int]:
    return [sum(1 for i in ids if i // size == g) for g in range(n_group)]


# --- budgets --------------------------------------------------------------------------------------


def test_layer_scope_keeps_top_k_per_layer() -> None:
    s = rand_scores(4, 10)
    plan = make_plan(s, keep=4, top_k=2, layers=[1, 3, 5, 7])
    for row, layer in enumerate(plan.layers):
        want = sorted(torch.topk(s[row], 4).indices.tolist())
        assert plan.kept[layer] == want
        assert plan.replaced[layer] == sorted(set(range(10)) - set(want))
    assert plan.top_k == 2 and plan.original_top_k == 2


def test_ties_break_to_lower_ids() -> None:
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]], dtype=torch.float64)
    assert make_plan(s, keep=3, top_k=1).kept[0] == [1, 2, 3]
    assert make_plan(torch.zeros(1, 6), keep=2, top_k=1).kept[0] == [0, 1]


def test_keep_fraction_rounding_and_parsing() -> None:
    assert experts_to_keep(0.5, 8) == 4
    assert experts_to_keep(0.3, 8) == 2  # round(2.4)
    assert experts_to_keep(1.0, 8) == 8
    assert experts_to_keep(0.01, 8) == 1
    assert experts_to_keep(0.4, 16, n_group=4) == 8  # 6.4 -> 8 (a multiple of the 4 groups)
    assert experts_to_keep(0.3, 16, n_group=4) == 4  # 4.8 -> 4
    assert experts_to_keep(0.3, 16, n_group=4, per_group="free") == 5
    assert parse_keep("64") == 64 and parse_keep("0.5") == 0.5 and parse_keep("25%") == 0.25
    with pytest.raises(UserError):
        parse_keep("half")


@pytest.mark.parametrize("keep", [0, -1, 9, 0.0, 1.5, -0.5, True, float("nan")])
def test_keep_out_of_range(keep) -> None:
    with pytest.raises(UserError):
        make_plan(rand_scores(2, 8), keep=keep, top_k=2)


def test_keep_below_top_k_needs_a_lower_top_k() -> None:
    s = rand_scores(2, 8)
    with pytest.raises(UserError, match="fewer than the 4 active"):
        make_plan(s, keep=2, top_k=4)
    plan = make_plan(s, keep=2, top_k=4, new_top_k=2)
    assert plan.top_k == 2 and plan.original_top_k == 4 and plan.kept_counts() == [2, 2]
    with pytest.raises(UserError):
        make_plan(s, keep=2, top_k=4, new_top_k=3)
    with pytest.raises(UserError):
        make_plan(s, keep=4, top_k=4, new_top_k=5)


def best_global_total(s: torch.Tensor, budget: int, floor: int) -> float:
    """Brute force: the largest total normalised score of any allocation meeting the floor."""
    n = normalize_per_layer(s)
    prefix = [
        torch.cat([torch.zeros(1, dtype=torch.float64), row.sort(descending=True).values.cumsum(0)])
        for row in n
    ]
    best = -1.0
    for counts in itertools.product(range(floor, s.shape[1] + 1), repeat=s.shape[0]):
        if sum(counts) == budget:
            best = max(best, sum(float(prefix[i][c]) for i, c in enumerate(counts)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_global_scope_is_optimal_under_the_floor(seed: int) -> None:
    s = rand_scores(3, 6, seed) ** 4  # peaked layers
    plan = make_plan(s, keep=3, scope="global", top_k=2)
    counts = plan.kept_counts()
    assert sum(counts) == 9 and min(counts) >= 2
    n = normalize_per_layer(s)
    total = float((n * plan.kept_mask()).sum())
    assert total == pytest.approx(best_global_total(s, 9, 2))
    for row, layer in enumerate(plan.layers):  # each layer keeps its own best
        assert plan.kept[layer] == sorted(torch.topk(s[row], counts[row]).indices.tolist())


def test_global_scope_moves_budget_to_flat_layers() -> None:
    peaked = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 1])
    flat = torch.ones(8)
    plan = make_plan(torch.stack([peaked, flat]).double(), keep=4, scope="global", top_k=2)
    assert plan.kept_counts() == [2, 6]


# --- group-limited routing ------------------------------------------------------------------------


def test_groups_keep_equal_counts_and_each_groups_best() -> None:
    s = rand_scores(3, 16, 5)
    plan = make_plan(s, keep=0.5, top_k=4, n_group=4, topk_group=2)
    for row, layer in enumerate(plan.layers):
        ids = plan.kept[layer]
        assert group_counts(ids, 4, 4) == [2, 2, 2, 2]
        for g in range(4):
            block = s[row, g * 4 : (g + 1) * 4]
            want = sorted((torch.topk(block, 2).indices + g * 4).tolist())
            assert [i for i in ids if i // 4 == g] == want


def test_group_rules() -> None:
    s = rand_scores(2, 16)
    with pytest.raises(UserError, match="multiple of 4"):
        make_plan(s, keep=6, top_k=2, n_group=4, topk_group=2)
    # top-2-sum groups (DeepSeek-V3) need two experts per group
    with pytest.raises(UserError, match="top two"):
        make_plan(s, keep=4, top_k=2, n_group=4, topk_group=2, group_score="top2_sum")
    make_plan(s, keep=8, top_k=2, n_group=4, topk_group=2, group_score="top2_sum")
    # the topk_group groups a token may use must hold top-k experts: 1 per group x 2 groups < 4
    with pytest.raises(UserError, match="groups a token may use"):
        make_plan(s, keep=4, top_k=4, n_group=4, topk_group=2)
    free = make_plan(s, keep=6, top_k=2, n_group=4, topk_group=2, per_group="free")
    assert free.kept_counts() == [6, 6]
    # free groups: a token limited to its 2 best groups must still reach top-k experts
    lopsided = torch.zeros(1, 16, dtype=torch.float64)
    lopsided[0, :2] = 1.0
    lopsided[0, [4, 8]] = 0.5  # groups keep 2, 1, 1, 0: the two worst non-empty hold only 2
    with pytest.raises(UserError, match="fewer than 3"):
        make_plan(lopsided, keep=4, top_k=3, n_group=4, topk_group=2, per_group="free")


def test_global_scope_with_groups() -> None:
    s = rand_scores(3, 16, 7) ** 3
    plan = make_plan(s, keep=8, scope="global", top_k=2, n_group=4, topk_group=2, group_score="top2_sum")
    counts = plan.kept_counts()
    assert sum(counts) == 24 and all(c % 4 == 0 and c >= 8 for c in counts)
    for layer in plan.layers:
        per = group_counts(plan.kept[layer], 4, 4)
        assert len(set(per)) == 1


# --- the plan file --------------------------------------------------------------------------------


def sample_plan(**kw: Any) -> Plan:
    return make_plan(
        rand_scores(3, 8),
        keep=4,
        top_k=2,
        layers=[1, 2, 4],
        model_fingerprint="f" * 64,
        model_type="qwen3_moe",
        method="easyep",
        **kw,
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    plan = sample_plan()
    path = plan.save(tmp_path / "plan.json")
    text = path.read_text()
    assert '"1": [' in text and text.count("\n") < 60  # id lists on one line
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary left behind
    back = Plan.load(path)
    assert back == plan
    assert back.replaced == plan.replaced
    data = json.loads(text)
    assert data["replaced"]["4"] == plan.replaced[4]


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _edit(plan: Plan, change) -> dict:
    data = json.loads(plan.dumps())
    change(data)
    return data


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.pop("kept"), "missing field"),
        (lambda d: d["kept"].pop("2"), "layer 2 has no kept"),
        (lambda d: d["kept"].__setitem__("2", [0, 0, 1, 3]), "twice"),
        (lambda d: d["kept"].__setitem__("2", [0, 1, 8, 3]), "outside"),
        (lambda d: d["kept"].__setitem__("2", [0]), "fewer than top_k"),
        (lambda d: d["kept"].__setitem__("9", [0, 1]), "not in layers"),
        (lambda d: d["replaced"].__setitem__("1", []), "complement"),
        (lambda d: d.__setitem__("format", "x"), "format"),
        (lambda d: d.__setitem__("num_experts", "8"), "integer"),
    ],
)
def test_load_rejects_bad_plans(tmp_path: Path, change, match: str) -> None:
    path = _write(tmp_path, _edit(sample_plan(), change))
    with pytest.raises(UserError, match=match):
        Plan.load(path)


def test_load_rejects_corrupted_and_group_invalid(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not valid JSON"):
        Plan.load(_write(tmp_path, '{"format": "moeprune-plan/1", '))
    with pytest.raises(UserError, match="does not exist"):
        Plan.load(tmp_path / "none.json")
    grouped = make_plan(rand_scores(2, 8), keep=4, top_k=2, n_group=2, topk_group=1)
    data = json.loads(grouped.dumps())
    data["kept"]["0"] = [0, 1, 2, 4]  # 3 + 1: unequal groups
    data["replaced"]["0"] = [3, 5, 6, 7]
    with pytest.raises(UserError, match="equal groups"):
        Plan.load(_write(tmp_path, data))


def test_check_model() -> None:
    plan = sample_plan()
    plan.check_model("f" * 64)
    with pytest.raises(UserError, match="another model"):
        plan.check_model("0" * 64)


def test_plan_summary_gate_share_and_memory() -> None:
    gate = rand_scores(3, 8, 3)
    plan = sample_plan()
    out = plan_summary(
        plan, FakeProfile({"gate": gate}), params_per_expert=10, other_params=1000, bytes_per_param=2
    )
    for row, entry in enumerate(out["layers"]):
        kept = plan.kept[plan.layers[row]]
        assert entry["kept"] == 4
        assert entry["gate_share"] == pytest.approx(float(gate[row, kept].sum() / gate[row].sum()))
    assert out["params_before"] == 1000 + 10 * 24 and out["params_after"] == 1000 + 10 * 12
    assert out["bytes_after"] == 2 * out["params_after"]


# --- the command line -----------------------------------------------------------------------------

FINGERPRINT = "a" * 64


def write_profile(path: Path, seed: int = 0, fingerprint: str = FINGERPRINT, **meta_extra: Any) -> Path:
    """A profile file as docs/profile-format.md describes it (2 layers, 8 experts, top-2)."""
    from safetensors.torch import save_file

    from moeprune.profile import FORMAT, checksums

    gen = torch.Generator().manual_seed(seed)
    n_layers, n_experts, n_tokens, ka = 2, 8, 30, 3
    hidden = int(meta_extra.get("hidden_size", 4))
    count = torch.randint(0, 12, (n_layers, n_experts), generator=gen).double()
    gate = count * torch.rand(n_layers, n_experts, generator=gen, dtype=torch.float64)
    tensors = {
        "tokens": torch.tensor([float(n_tokens)], dtype=torch.float64),
        "count": count,
        "gate": gate,
        "prob": gate + 0.1,
        "reap_sum": gate * 2,
        "easyep": gate * 0.5,
        "premoe_v1": gate * 0.7,
        "premoe_q": torch.softmax(torch.randn(n_layers, n_tokens, ka, generator=gen), -1)
        .sort(-1, descending=True)
        .values,
        "premoe_f": torch.rand(n_layers, n_tokens, ka, generator=gen),
        "premoe_idx": torch.stack(
            [
                torch.stack([torch.randperm(n_experts, generator=gen)[:ka] for _ in range(n_tokens)])
                for _ in range(n_layers)
            ]
        ).int(),
        "mone_mean": torch.randn(n_layers, n_experts, hidden, generator=gen),
        "mone_m2": torch.rand(n_layers, n_experts, hidden, generator=gen),
    }
    meta = {
        "format": FORMAT,
        "tool_version": "0.1.0",
        "model": "tiny",
        "model_fingerprint": fingerprint,
        "model_type": "qwen3_moe",
        "architecture": "Qwen3MoeForCausalLM",
        "layers": [0, 1],
        "num_experts": n_experts,
        "top_k": 2,
        "hidden_size": hidden,
        "tokens": n_tokens,
        "samples": 3,
        "data": [],
        "settings": {"premoe_ka": ka},
        **meta_extra,
    }
    text = json.dumps(meta)
    save_file(tensors, str(path), metadata={"meta": text, "sha256": json.dumps(checksums(tensors, text))})
    return path


@pytest.fixture
def profile_module():
    import moeprune.profile

    return moeprune.profile


def test_cli_writes_a_plan(tmp_path: Path, capsys, profile_module) -> None:
    prof = write_profile(tmp_path / "a.profile.safetensors")
    out = tmp_path / "plan.json"
    code, stdout, err = run_cli(
        capsys, "plan", str(prof), "--method", "easyep", "--keep", "0.5", "--out", str(out)
    )
    assert code == 0, err
    plan = Plan.load(out)
    assert plan.kept_counts() == [4, 4] and plan.method == "easyep" and plan.model_fingerprint == FINGERPRINT
    gate = profile_module.Profile.load(prof).tensors["gate"].double()
    assert plan.kept[0] == sorted(torch.topk(gate[0] * 0.5, 4).indices.tolist())
    assert "gate mass kept" in stdout


def test_cli_mixed_domain_global_and_groups(tmp_path: Path, capsys, profile_module) -> None:
    routing = {"top_k": 2, "n_group": 2, "topk_group": 1, "group_score": "max"}
    a = write_profile(tmp_path / "a.profile.safetensors", 1, routing=routing)
    b = write_profile(tmp_path / "b.profile.safetensors", 2, routing=routing)
    out = tmp_path / "plan.json"
    code, _, err = run_cli(
        capsys,
        "plan",
        str(a),
        "--profile",
        str(b),
        "--method",
        "gate",
        "--keep",
        "4",
        "--scope",
        "global",
        "--out",
        str(out),
    )
    assert code == 0, err
    plan = Plan.load(out)
    assert sum(plan.kept_counts()) == 8 and plan.settings["mixed_domain"] is True
    for layer in plan.layers:
        per = group_counts(plan.kept[layer], 2, 4)
        assert per[0] == per[1]


def test_cli_memory_from_model(tmp_path: Path, capsys, profile_module) -> None:
    from moeprune.summary import summarize
    from moeprune.testing.tiny import tiny_config

    cfg = tiny_config("qwen3_moe")
    cfg.save_pretrained(tmp_path / "model")
    info = summarize(cfg)
    fields = profile_module.fingerprint_fields(cfg)
    prof = write_profile(
        tmp_path / "a.profile.safetensors",
        fingerprint=profile_module.model_fingerprint(fields),
        layers=info.moe_layers,
        num_experts=info.num_experts,
        hidden_size=fields["hidden_size"],
        num_hidden_layers=fields["num_hidden_layers"],
    )
    args = ["plan", str(prof), "--method", "reap", "--keep", "4", "--model", str(tmp_path / "model")]
    code, stdout, err = run_cli(capsys, *args, "--out", str(tmp_path / "p.json"))
    assert code == 0, err
    assert "parameters" in stdout and "->" in stdout
    # a profile of another model is refused when --model is given
    other = write_profile(
        tmp_path / "b.profile.safetensors", layers=info.moe_layers, num_experts=info.num_experts
    )
    args[1] = str(other)
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "q.json"))
    assert code == 2 and "profile this model first" in err and not (tmp_path / "q.json").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--method", "magic", "--keep", "4"], "unknown method"),
        (["--method", "gate", "--keep", "9"], "model has 8"),
        (["--method", "gate", "--keep", "0"], "cannot keep 0"),
        (["--method", "gate", "--keep", "1.5"], "outside (0, 1]"),
        (["--method", "gate", "--keep", "1"], "fewer than the 2 active"),
        (["--method", "gate", "--keep", "lots"], "not a number"),
        (["--method", "gate", "--keep", "4", "--scope", "world"], "unknown scope"),
        (["--method", "gate", "--keep", "4", "--seed", "3"], "--seed does not apply"),
        (["--method", "premoe", "--keep", "4", "--premoe-ka", "7"], "K_a=7"),
    ],
)
def test_cli_bad_input_is_one_line(
    tmp_path: Path, capsys, profile_module, args: list[str], match: str
) -> None:
    prof = write_profile(tmp_path / "a.profile.safetensors")
    out = tmp_path / "plan.json"
    code, stdout, err = run_cli(capsys, "plan", str(prof), *args, "--out", str(out))
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_corrupted_and_mismatched_profiles(tmp_path: Path, capsys, profile_module) -> None:
    out = tmp_path / "plan.json"
    bad = tmp_path / "bad.profile.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, _, err = run_cli(capsys, "plan", str(bad), "--method", "gate", "--keep", "4", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    a = write_profile(tmp_path / "a.profile.safetensors")
    b = write_profile(tmp_path / "b.profile.safetensors", fingerprint="b" * 64)
    code, _, err = run_cli(
        capsys, "plan", str(a), "--profile", str(b), "--method", "gate", "--keep", "4", "--out", str(out)
    )
    assert code == 2 and "different models" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# --- hints that work (issue 12 §5) ----------------------------------------------------------------


def _hinted(line: str) -> list[list[tuple[str, str]]]:
    """The alternatives an error line's fix names, each as its (flag, value) pairs."""
    fix = line.strip().split("; ", 1)[1].rstrip(".")
    alternatives = [re.findall(r"(--[a-z-]+) ([\w.]+)", alt) for alt in re.split(r",? or ", fix)]
    return [alt for alt in alternatives if alt]


ROUTERS = {
    "top2-sum groups (DeepSeek-V3)": {"top_k": 2, "n_group": 2, "topk_group": 1, "group_score": "top2_sum"},
    "max groups, top 1 (DeepSeek-V2)": {"top_k": 2, "n_group": 2, "topk_group": 1, "group_score": "max"},
    "4 groups, top 2": {"top_k": 2, "n_group": 4, "topk_group": 2, "group_score": "max"},
    "no groups": {"top_k": 2},
}


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize(
    "given",
    [
        ["--keep", "2"],
        ["--keep", "3"],
        ["--keep", "1"],
        ["--keep", "0.125"],
        ["--keep", "6", "--per-group", "free"],
    ],
)
def test_every_plan_hint_works(tmp_path: Path, capsys, profile_module, router, given) -> None:
    """`plan --keep 2` suggested --per-group free, which plan then refused for that router: every
    flag a refusal names must give a plan when followed, and a refusal names at least one."""
    prof = write_profile(tmp_path / "p.safetensors", 3, routing=ROUTERS[router])
    out = tmp_path / "plan.json"

    def run(args: list[str]) -> tuple[int, str]:
        code, _, err = run_cli(capsys, "plan", prof, "--method", "gate", *args, "--out", out, "--force")
        return code, err

    code, err = run(given)
    if code == 0:
        return
    assert_user_error(code, err)
    alternatives = _hinted(err)
    assert alternatives, err
    for alt in alternatives:
        args = dict(zip(given[::2], given[1::2], strict=True))
        args.update(alt)
        code, err2 = run([x for kv in args.items() for x in kv])
        assert code == 0, f"{err.strip()}\n  followed {alt}: {err2.strip()}"


@pytest.mark.parametrize(
    "meta, words",
    [
        ({"samples": 2**40}, "30 tokens from 1099511627776 samples"),
        ({"samples": -1}, "samples <= tokens"),
        ({"top_k": 2**40}, "top-k 1099511627776"),
        ({"layers": [0, 0]}, "2 MoE layers"),
        ({"layers": [0, "1"]}, "not a list of layer indices"),
    ],
)
def test_profile_header_sizes_are_bounded(tmp_path: Path, capsys, profile_module, meta, words) -> None:
    """Issue 11 #12: sizes read from a profile's header are bounded before use (a header claiming
    2**40 samples, with no per-sample tensor to contradict it, loaded)."""
    prof = write_profile(tmp_path / "p.safetensors", **meta)
    with pytest.raises(UserError, match="is corrupted: .*" + re.escape(words)):
        profile_module.Profile.load(prof)


def test_router_unchanged_plans_any_count_in_any_group() -> None:
    """Novice mode keeps the router whole: fewer experts than top-k, unequal groups, and the plan
    file says so and reads back; the routed rule refuses the same keep."""
    from moeprune.plan import Plan, make_plan

    scores = torch.arange(16, dtype=torch.float64).flip(0).repeat(2, 1)  # expert 0 best
    routing = dict(top_k=4, n_group=4, topk_group=2, group_score="top2_sum")
    with pytest.raises(UserError):
        make_plan(scores, keep=2, **routing)
    plan = make_plan(scores, keep=2, router="unchanged", **routing)
    assert plan.kept == {0: [0, 1], 1: [0, 1]}  # both in group 0: groups are not equalised
    assert plan.top_k == 4 and plan.settings["router"] == "unchanged"
    back = Plan.from_json(json.loads(plan.dumps()))
    assert back.kept == plan.kept and back.top_k == 4
    glob = make_plan(scores * torch.tensor([[1.0], [3.0]]), keep=3, scope="global", router="unchanged", **routing)
    assert sum(glob.kept_counts()) == 6 and min(glob.kept_counts()) >= 1
    # a routed plan file with fewer than top-k experts is still refused
    data = json.loads(plan.dumps())
    data["settings"].pop("router")
    with pytest.raises(UserError, match="fewer than top_k"):
        Plan.from_json(data)
