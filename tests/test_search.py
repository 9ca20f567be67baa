"""`moeprune search`: bisection over experts kept with early stop (against an exhaustive scan on a
synthetic evaluator), the Pareto frontier, and the command end to end on two stock architectures
(DeepSeek-V3 with routing groups, Qwen3-MoE) with --prune and the recipe it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import moeprune.testing.tiny as tiny
from moeprune.cli import main
from moeprune.search import Sizes, relative_quality, search_plans
from moeprune.testing.tiny import byte_tokenizer

L, E, TOP_K = 3, 8, 2


class FakeProfile:
    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        count = torch.rand(L, E, generator=gen, dtype=torch.float64) * 100 + 1
        gate = count * torch.rand(L, E, generator=gen, dtype=torch.float64)
        self.tensors = {
            "count": count,
            "gate": gate,
            "easyep": gate * torch.rand(L, E, generator=gen, dtype=torch.float64),
            "reap_sum": gate * 2,
            "mone_m2": torch.rand(L, E, 4, generator=gen, dtype=torch.float64),
            "mone_mean": torch.zeros(L, E, 4),
            "tokens": torch.tensor([500.0], dtype=torch.float64),
        }
        self.meta = {"layers": [1, 2, 3], "num_experts": E, "top_k": TOP_K, "hidden_size": 4,
                     "routing": {"top_k": TOP_K, "n_group": 1, "topk_group": 1}}  # fmt: skip


def _sizes(prof: FakeProfile) -> Sizes:
    return Sizes(other_params=1000, params_per_expert=100, hidden=4, bytes_per_param=4.0, top_k=TOP_K,
                 counts=prof.tensors["count"])  # fmt: skip


def _evaluator(calls: list[Any]):
    """Accuracy grows with the gate mass the plan keeps (monotone in K for one configuration);
    novices are a little better than removal."""
    prof = FakeProfile()
    gate = prof.tensors["gate"]

    def run(plan, mode):
        calls.append((plan.method, mode, plan.kept_counts()))
        share = float((gate * plan.kept_mask()).sum() / gate.sum())
        return {"dev": {"accuracy": min(1.0, share + (0.1 if mode == "novice" else 0.0))}}

    return prof, run


@pytest.mark.parametrize("target", [0.6, 0.8, 0.95])
def test_bisection_finds_what_an_exhaustive_scan_finds(target: float) -> None:
    from moeprune.score import score
    from moeprune.search import make_variant

    calls: list[Any] = []
    prof, run = _evaluator(calls)
    full = {"dev": {"accuracy": 1.0}}
    kinds = {"dev": "exact_match"}
    res = search_plans(run, full, kinds, prof, _sizes(prof), target=target, methods=["gate", "easyep"],
                       select="mean")  # fmt: skip
    # exhaustive: every method x mode x scope x K
    best = None
    for method in ("gate", "easyep"):
        scores = score(prof, method)
        for mode in ("novice", "remove"):
            for scope in ("layer", "global"):
                for k in range(1, E):
                    plan = make_variant(scores, prof.meta, method, mode, scope, k)
                    if plan is None:
                        continue
                    q = relative_quality(full, run(plan, mode), kinds)
                    size = _sizes(prof).of(plan, mode)
                    if q >= target and (best is None or size < best[0]):
                        best = (size, method, mode, scope, k)
    assert res.best is not None and best is not None
    assert (res.best.bytes, res.best.active_params) == best[0]
    assert res.best.quality >= target and res.best.passed
    # cheaper than the scan: bisection and early stop (2 methods x 4 configurations x 7 K = 56)
    assert len(res.points) < 30
    # the frontier: bytes grow and quality grows strictly along it, the full model's quality is 1
    front = res.frontier()
    assert all(a.bytes <= b.bytes and a.quality < b.quality for a, b in zip(front, front[1:], strict=False))
    assert res.full.quality == 1.0 and res.full.method == "full"


def test_novices_may_keep_fewer_experts_than_top_k() -> None:
    calls: list[Any] = []
    prof, run = _evaluator(calls)
    res = search_plans(run, {"dev": {"accuracy": 1.0}}, {"dev": "exact_match"}, prof, _sizes(prof),
                       target=0.2, methods=["gate"], modes=["novice"], select="mean")  # fmt: skip
    assert res.best is not None and res.best.experts < TOP_K  # 1 expert per layer, router unchanged
    assert res.plan.settings["router"] == "unchanged"


def test_relative_quality_takes_the_worst_task_and_inverts_perplexity() -> None:
    full = {"a": {"accuracy": 0.8}, "b": {"perplexity": 10.0}}
    got = {"a": {"accuracy": 0.8}, "b": {"perplexity": 12.5}}
    assert relative_quality(full, got, {"a": "exact_match", "b": "perplexity"}) == pytest.approx(0.8)
    assert relative_quality(full, {"a": {"accuracy": 0.4}, "b": {"perplexity": 10.0}},
                            {"a": "exact_match", "b": "perplexity"}) == pytest.approx(0.5)  # fmt: skip


def test_wilson_lower_bound_is_the_root_of_the_score_test() -> None:
    """The bound p0 solves (p - p0) / sqrt(p0 (1 - p0) / n) = z (the one-sided score test at 95%):
    checked against that equation, not the closed form; 12 of 12 right bounds at 12 / (12 + z^2)."""
    from statistics import NormalDist

    from moeprune.search import wilson_lower

    z = NormalDist().inv_cdf(0.95)
    for p, n in ((0.5, 100), (0.9, 12), (11 / 12, 12), (0.3, 7), (0.99, 1000)):
        lb = wilson_lower(p, n)
        assert 0.0 < lb < p
        assert (p - lb) / math.sqrt(lb * (1 - lb) / n) == pytest.approx(z, rel=1e-9)
    assert wilson_lower(1.0, 12) == pytest.approx(12 / (12 + z * z)) == pytest.approx(0.8160, abs=1e-4)
    assert wilson_lower(0.0, 12) == 0.0 and wilson_lower(1.0, 0) == 0.0
    # n all-correct records certify a target t only from n >= z^2 t / (1 - t) on (the module doc)
    for t, n in ((0.9, 25), (0.95, 52), (0.99, 268)):
        assert wilson_lower(1.0, n) >= t > wilson_lower(1.0, n - 1)


def _counted(run, n: int):
    """The synthetic evaluator with each task's record count, as variant_evaluator reports it."""

    def counted(plan, mode):
        return {task: {**m, "n": n} for task, m in run(plan, mode).items()}

    return counted


def test_bound_rule_rejects_a_variant_that_passes_by_its_point_estimate() -> None:
    """On 12 dev records the smallest variant whose accuracy passes 0.7 (K=4: 0.73) does not pass at
    its lower bound (0.49); the bound rule picks K=7 (0.96, bound 0.76). With 10^6 records the
    bound is close to the point estimate and both rules agree."""
    from moeprune.search import relative_quality, wilson_lower

    prof, run = _evaluator([])
    full, kinds = {"dev": {"accuracy": 1.0}}, {"dev": "exact_match"}
    kw = {"target": 0.7, "methods": ["gate"], "modes": ["remove"], "scopes": ["layer"]}
    mean = search_plans(_counted(run, 12), full, kinds, prof, _sizes(prof), select="mean", **kw)
    bound = search_plans(_counted(run, 12), full, kinds, prof, _sizes(prof), select="bound", **kw)
    assert mean.best is not None and bound.best is not None and bound.select == "bound"
    m = mean.best
    assert m.passed and m.quality >= 0.7 and m.bound is None
    assert wilson_lower(m.quality, 12) < 0.7  # passes by the point estimate only
    assert relative_quality(full, m.tasks, kinds, bound=True) < 0.7
    b = bound.best
    assert b.bound == pytest.approx(wilson_lower(b.quality, 12)) and b.bound >= 0.7 and b.passed
    assert (m.experts, b.experts) == (4, 7) and b.bytes > m.bytes
    rejected = [p for p in bound.points if p.quality >= 0.7 and not p.passed]
    assert rejected and all(p.bound < 0.7 for p in rejected)
    assert all(p.bound >= 0.7 for p in bound.points if p.passed)
    assert bound.to_json()["select"] == "bound" and bound.to_json()["confidence"] == 0.95
    big = search_plans(_counted(run, 10**6), full, kinds, prof, _sizes(prof), select="bound", **kw)
    assert big.best is not None and big.best.experts == m.experts


def test_auto_rule_takes_the_bound_only_where_the_dev_set_can_certify_the_target() -> None:
    """The default: 12 of 12 right bounds the accuracy at 0.816, so on 12 records a 0.7 target is
    selected at the bound (the same pick as select="bound") and a 0.95 target on the mean (the
    same pick as select="mean", where the bound would pass nothing); without record counts, the
    mean. Each run logs which rule it took."""
    prof, run = _evaluator([])
    kinds = {"dev": "exact_match"}
    full12 = {"dev": {"accuracy": 1.0, "n": 12}}
    for target, rule in ((0.7, "bound"), (0.95, "mean")):
        kw = {"target": target, "methods": ["gate"], "modes": ["remove"], "scopes": ["layer"]}
        lines: list[str] = []
        auto = search_plans(_counted(run, 12), full12, kinds, prof, _sizes(prof), log=lines.append, **kw)
        same = search_plans(_counted(run, 12), full12, kinds, prof, _sizes(prof), select=rule, **kw)
        assert auto.select == rule and auto.best is not None
        assert (auto.best.experts, auto.best.bound) == (same.best.experts, same.best.bound)
        assert any(("lower bound of each" in x) == (rule == "bound") for x in lines if "selection:" in x)
    bare = search_plans(run, {"dev": {"accuracy": 1.0}}, kinds, prof, _sizes(prof), target=0.7, methods=["gate"])
    assert bare.select == "mean" and bare.best is not None


def test_bound_rule_needs_record_counts_and_leaves_perplexity_as_it_is() -> None:
    from moeprune.search import relative_quality

    with pytest.raises(ValueError, match="record count"):
        relative_quality({"a": {"accuracy": 1.0}}, {"a": {"accuracy": 1.0}}, {"a": "exact_match"}, bound=True)
    full, got = {"b": {"perplexity": 10.0}}, {"b": {"perplexity": 12.5}}
    assert relative_quality(full, got, {"b": "perplexity"}, bound=True) == pytest.approx(0.8)


def test_no_pick_at_the_bound_says_what_to_change() -> None:
    from moeprune.search_run import summary_line

    prof, run = _evaluator([])
    full, kinds = {"dev": {"accuracy": 1.0}}, {"dev": "exact_match"}
    # every accuracy of 12 records, even 12 of 12, is below 0.95 at its bound (0.816)
    res = search_plans(
        _counted(run, 12), full, kinds, prof, _sizes(prof), target=0.95, methods=["gate"], select="bound"
    )
    assert res.best is None and any(p.quality >= 0.95 for p in res.points)
    line = summary_line(res)
    assert "95% lower bound" in line and "--dev" in line and "--select mean" in line


def test_variant_evaluator_reports_each_tasks_record_count() -> None:
    """The bound needs n: the evaluator the search runs puts it beside each task's metrics."""
    from moeprune.evaluate.tasks import EXACT_MATCH, PERPLEXITY, Task
    from moeprune.search_run import variant_evaluator

    class Novices:
        def novices(self, fit):
            return torch.zeros(L, E, 4)

    lm = tiny.tiny_model("qwen3_moe")
    tasks = [Task("dev", EXACT_MATCH, [{"prompt": f"{i} + 1 =", "answer": "x"} for i in range(3)]),
             Task("dev-text", PERPLEXITY, [{"text": "alpha beta gamma"}] * 2)]  # fmt: skip
    got = variant_evaluator(lm, byte_tokenizer(), Novices(), tasks, max_new_tokens=2)(None)
    assert got["dev"]["n"] == 3 and "accuracy" in got["dev"]
    assert got["dev-text"]["n"] == 2 and "perplexity" in got["dev-text"]


# --- end to end ---------------------------------------------------------------------------------


def _save(model_type: str, folder: Path) -> Path:
    m = tiny.tiny_model(model_type)
    m.config.eos_token_id, m.config.pad_token_id, m.config.bos_token_id = 2, 0, 1
    m.generation_config.eos_token_id = 2
    m.generation_config.pad_token_id = 0
    m.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("demos")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    with open(d / "demos.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"text": " ".join(words[(i + j) % 8] for j in range(6)) + f" {i}"}) + "\n")
    return d / "demos.jsonl"


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_search_end_to_end_with_prune(model_type: str, demos: Path, tmp_path: Path) -> None:
    model = _save(model_type, tmp_path / model_type)
    out = tmp_path / "search"
    args = ["search", model, "--data", demos, "--out", out, "--target", "0.9", "--dev", "4",
            "--method", "mone", "--method", "premoe", "--test", f"ppl=perplexity:{demos}", "--prune"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    for name in ("train.jsonl", "dev.jsonl", "profile.safetensors", "frontier.md", "frontier.png", "search.json",
                 "plan.json", "recipe.yaml"):  # fmt: skip
        assert (out / name).is_file(), name
    assert len((out / "dev.jsonl").read_text().splitlines()) == 4
    assert len((out / "train.jsonl").read_text().splitlines()) == 8
    result = json.loads((out / "search.json").read_text())
    best = result["best"]
    assert best is not None and best["quality"] >= 0.9 and best["kept_total"] < result["full"]["kept_total"]
    # the checkpoint is the recipe's: its plan is the searched one, and its card reports the test set
    assert json.loads((out / "model" / "plan.json").read_text())["kept"] == result["plan"]["kept"]
    card = (out / "model" / "README.md").read_text()
    assert "moeprune search" in card and "test tasks" in card
    assert result["test"] is not None and result["test"]["quality"] > 0
    from moeprune import load

    pruned = load(out / "model")
    assert pruned is not None


def test_prune_target_and_api(demos: Path, tmp_path: Path) -> None:
    from moeprune import api

    model = _save("qwen3_moe", tmp_path / "qwen")
    out = tmp_path / "pruned"
    args = ["prune", model, "--data", demos, "--target", "0.9", "--out", out]
    assert main([str(a) for a in args]) == 0
    assert (out / "config.json").is_file() and (tmp_path / "pruned.search" / "recipe.yaml").is_file()
    res = api.search(model, [demos], tmp_path / "api", target=0.9, dev=3, methods=["mone"], modes=["remove"],
                     scopes=["layer"])  # fmt: skip
    assert (
        res.best is not None
        and res.best.mode == "remove"
        and res.plan.kept_counts() == [res.best.experts] * 2
    )


def test_search_options_are_declared_once(tmp_path: Path) -> None:
    """api.search and run_search take SearchOptions' fields as keywords (or one options object):
    one declaration of the defaults; a misspelt option is refused before any work."""
    from moeprune import api
    from moeprune.search_run import SearchOptions, search_options

    assert search_options() == SearchOptions() and SearchOptions().target == 0.99
    base = SearchOptions(target=0.5, dev=4)
    assert search_options(base, dev=3) == SearchOptions(target=0.5, dev=3)
    with pytest.raises(TypeError, match="tagret"):
        api.search(tmp_path / "m", ["d.jsonl"], tmp_path / "out", tagret=0.5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "1.5"], "--target 1.5 is outside"),
        (["--method", "nope"], "unknown method"),
        (["--mode", "mask"], "unknown mode"),
        (["--dev", "12"], "cannot hold out 12 of 12"),
        (["--metric", "bleu"], "unknown --metric"),
        (["--select", "median"], "unknown --select"),
    ],
)
def test_search_user_errors(extra: list[str], message: str, demos: Path, tmp_path: Path, capsys) -> None:
    model = _save("qwen3_moe", tmp_path / "qwen")
    code = main([str(a) for a in ["search", model, "--data", demos, "--out", tmp_path / "s", *extra]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_prune_target_refuses_what_the_search_chooses(demos: Path, tmp_path: Path, capsys) -> None:
    code = main(["prune", str(tmp_path), "--data", str(demos), "--target", "0.9", "--method", "mone",
                 "--out", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "cannot be given with --target" in capsys.readouterr().err
