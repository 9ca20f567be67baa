"""`moeprune report`: the numbers (overlap, few-shot stability, gate mass kept) and the command."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from _cli import run_cli
from moeprune.errors import UserError
from moeprune.profile import Profile
from moeprune.report import (
    compute_report,
    domain_overlap,
    few_shot_overlap,
    gate_share,
    jaccard,
    kept_gate_mass,
    top_sets,
)

L, E, S, T, KA, H = 2, 8, 12, 20, 3, 4
FINGERPRINT = "b" * 64


def make_profile(seed: int = 0, per_sample: bool = True, fingerprint: str = FINGERPRINT) -> Profile:
    """A profile as docs/profile-format.md describes it (2 layers, 8 experts, top-2, 12 samples)."""
    gen = torch.Generator().manual_seed(seed)
    sample_gate = torch.rand(S, L, E, generator=gen) ** 3  # skewed: a few experts dominate
    gate = sample_gate.double().sum(0)
    tensors = {
        "tokens": torch.tensor([float(T)], dtype=torch.float64),
        "count": (gate * 3).round(),
        "gate": gate,
        "prob": gate + 0.1,
        "reap_sum": gate * 2,
        "easyep": gate * 0.5,
        "premoe_v1": gate * 0.7,
        "premoe_q": torch.softmax(torch.randn(L, T, KA, generator=gen), -1).sort(-1, descending=True).values,
        "premoe_f": torch.rand(L, T, KA, generator=gen),
        "premoe_idx": torch.randint(0, E, (L, T, KA), generator=gen).int(),
        "mone_mean": torch.randn(L, E, H, generator=gen),
        "mone_m2": torch.rand(L, E, H, generator=gen),
    }
    if per_sample:
        tensors["sample_gate"] = sample_gate
    meta = {
        "format": "moeprune-profile/1",
        "tool_version": "0.1.0",
        "model": "tiny",
        "model_fingerprint": fingerprint,
        "model_type": "qwen3_moe",
        "architecture": "Qwen3MoeForCausalLM",
        "layers": [1, 3],
        "num_experts": E,
        "top_k": 2,
        "hidden_size": H,
        "tokens": T,
        "samples": S,
        "data": [],
        "settings": {"premoe_ka": KA, "per_sample": per_sample},
    }
    prof = Profile(meta=meta, tensors=tensors)
    prof.validate()
    return prof


def test_gate_share_and_top_sets() -> None:
    gate = torch.tensor([[1.0, 3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    share = gate_share(gate)
    assert share[0].tolist() == [0.125, 0.375, 0.0, 0.5] and share[1].tolist() == [0.0] * 4
    assert top_sets(gate, 2) == [{1, 3}, {0, 1}]  # ties break to the lower id
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3) and jaccard(set(), set()) == 1.0


def test_overlap_of_identical_profiles_is_one() -> None:
    a, b = make_profile(0), make_profile(0)
    rep = compute_report([a, b], ["a", "b"], "easyep")
    assert rep["top"] == E // 2
    assert rep["overlap"] == [{"a": 0, "b": 1, "per_layer": [1.0, 1.0]}]
    c = make_profile(5)
    ov = domain_overlap([a["easyep"], c["easyep"]], 4)[(0, 1)]
    want = [jaccard(x, y) for x, y in zip(top_sets(a["gate"], 4), top_sets(c["gate"], 4), strict=True)]
    assert ov == want and all(0.0 <= v <= 1.0 for v in ov)


def test_few_shot_overlap_reaches_one_and_grows() -> None:
    prof = make_profile(1)
    fs = few_shot_overlap(prof["sample_gate"], 4)
    assert sorted(fs) == [1, 2, 5, 10, 12]  # 25 capped at S = 12
    assert fs[12] == [1.0, 1.0]
    means = [sum(fs[n]) / L for n in sorted(fs)]
    assert means[-1] >= means[0]  # monotone-ish: more demonstrations, closer to the full set
    assert all(means[i + 1] >= means[i] - 0.15 for i in range(len(means) - 1))
    assert few_shot_overlap(prof["sample_gate"], 4) == fs  # seeded


def test_kept_gate_mass_by_hand() -> None:
    gate = torch.tensor([[4.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([[0.0, 5.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert kept_gate_mass(gate, scores, 0.25) == [pytest.approx(3 / 10)]  # keeps experts 1, 2
    assert kept_gate_mass(gate, scores, 0.375) == [pytest.approx(6 / 10)]  # + 3
    assert kept_gate_mass(gate, scores, 0.5) == [pytest.approx(1.0)]  # + 0 (tie of zeros -> lower id)
    assert kept_gate_mass(gate, scores, 0.125) == [pytest.approx(1 / 10)]
    prof = make_profile(2)
    rep = compute_report([prof], ["a"], "gate")
    got = rep["domains"][0]["kept_mass"][0.5]
    g = prof["gate"]
    want = [float(g[r].sort(descending=True).values[:4].sum() / g[r].sum()) for r in range(L)]
    assert got == pytest.approx(want)


def test_different_models_are_refused() -> None:
    with pytest.raises(UserError, match="different models"):
        compute_report([make_profile(0), make_profile(0, fingerprint="c" * 64)], ["a", "b"], "easyep")


def _save(tmp_path: Path, name: str, **kw: Any) -> Path:
    path = tmp_path / f"{name}.profile.safetensors"
    make_profile(**kw).save(path)
    return path


def test_cli_writes_a_page_whose_links_exist(tmp_path: Path, capsys) -> None:
    a = _save(tmp_path, "code", seed=0)
    b = _save(tmp_path, "math", seed=3, per_sample=False)
    out = tmp_path / "rep"
    code, _, err = run_cli(capsys, "report", str(a), str(b), "--out", str(out), "--top", "3")
    assert code == 0, err
    page = (out / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all((out / r).is_file() for r in refs)
    assert {p.name for p in out.glob("*.png")} == set(refs)
    assert "diff_0_1.png" in refs and "overlap.png" in refs and "fewshot_0.png" in refs
    assert "no per-sample data" in page  # math has none: said on the page, not an error
    assert not list(tmp_path.glob(".rep.*"))
    # a non-empty --out is refused unless --force
    code, _, err = run_cli(capsys, "report", str(a), "--out", str(out))
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "report", str(a), "--out", str(out), "--force")
    assert code == 0, err
    assert "diff_0_1.png" not in (out / "index.html").read_text()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--method", "nope"], "unknown method"),
        (["--top", "0"], "--top"),
        (["--top", "99"], "--top 99"),
        (["MISSING"], "does not exist"),
        (["OTHER"], "different models"),
        (["NOTPROFILE"], "not a readable"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    a = _save(tmp_path, "a", seed=0)
    paths = {
        "MISSING": str(tmp_path / "missing.profile.safetensors"),
        "OTHER": str(_save(tmp_path, "other", fingerprint="d" * 64)),
        "NOTPROFILE": str(tmp_path / "junk.safetensors"),
    }
    (tmp_path / "junk.safetensors").write_text(json.dumps({"x": 1}))
    args = [paths.get(x, x) for x in extra]
    out = tmp_path / "rep"
    code, _, err = run_cli(capsys, "report", str(a), *args, "--out", str(out))
    assert code == 2, err
    assert match in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".rep.*"))
