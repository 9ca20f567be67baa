"""Least-squares novices (``--novice lsq``, docs/methods.md): the checkpoint equals its reference
(each replaced expert's output is g * n_i with n_i = Σ g² e / Σ g² computed naively per token), the
fit lowers the calibration tokens' block-output error below MoNE's mean, and a profile written
before the statistic existed still loads, with one clear line only when lsq is asked for."""

from __future__ import annotations

import pytest
import torch

import moeprune
import moeprune.testing.tiny as tiny
from _cli import assert_user_error, run_cli
from moeprune import api
from moeprune.arch import BlockControl, find_moe_blocks, patch_moe
from moeprune.calibrate import calibrate
from moeprune.errors import UserError
from moeprune.profile import Profile

TOL = {"rtol": 1e-5, "atol": 1e-5}
LENGTHS = [9, 3, 30, 17, 24]


def _seqs(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model, its profile on known token sequences, and those sequences."""
    d = tmp_path_factory.mktemp("lsq")
    model = tiny.tiny_model("qwen3_moe")
    model.save_pretrained(d / "model")
    blocks = find_moe_blocks(model)
    seqs = _seqs(model.config.vocab_size)
    t = calibrate(model, seqs, blocks=blocks, batch_size=2)
    prof = Profile.build(
        t,
        model=str(d / "model"),
        config=model.config,
        blocks=blocks,
        samples=len(seqs),
        data=[{"path": "seqs", "sha256": "0" * 64, "records": len(seqs)}],
        settings={},
    )
    prof.save(d / "p.profile.safetensors")
    return model, blocks, seqs, prof, d


@torch.no_grad()
def _events(model, blocks, seqs) -> dict[int, list]:
    """Per block index: (top_k_index, top_k_weights, expert_outputs) of every calibration record."""
    out: dict[int, list] = {b.index: [] for b in blocks}

    def keep(ev):
        out[ev.block.index].append((ev.top_k_index.clone(), ev.top_k_weights.clone(), ev.expert_outputs.clone()))

    with patch_moe(model, blocks, observer=keep):
        for seq in seqs:
            model(input_ids=torch.tensor([seq]), use_cache=False)
    return out


def _naive_lsq(events, E: int, H: int) -> torch.Tensor:
    """n_i = Σ g² e / Σ g² over the (token, slot) pairs routed to i, one pair at a time in float64."""
    num = torch.zeros(E, H, dtype=torch.float64)
    den = torch.zeros(E, dtype=torch.float64)
    for idx, g, e in events:
        for t in range(idx.shape[0]):
            for j in range(idx.shape[1]):
                i, w = int(idx[t, j]), float(g[t, j])
                num[i] += w * w * e[t, j].double()
                den[i] += w * w
    return torch.where(den.unsqueeze(-1) > 0, num / den.clamp(min=1e-300).unsqueeze(-1), torch.zeros_like(num))


def _block_error(events, replaced: list[int], novices: torch.Tensor) -> float:
    """Σ_t ‖Σ_{slots j with i_j replaced} g_j (e_j − n_{i_j})‖²: how far the block output moves on
    the calibration tokens when the replaced experts become the constants ``novices`` [E, H]."""
    total = 0.0
    rep = torch.zeros(novices.shape[0], dtype=torch.bool)
    rep[replaced] = True
    for idx, g, e in events:
        diff = (e.double() - novices.double()[idx]) * g.double().unsqueeze(-1) * rep[idx].unsqueeze(-1)
        total += float(diff.sum(1).square().sum())
    return total


def _ids(model) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def test_statistic_equals_the_naive_per_token_fit(setup):
    model, blocks, seqs, prof, _ = setup
    events = _events(model, blocks, seqs)
    H = model.config.hidden_size
    for row, b in enumerate(blocks):
        ref = _naive_lsq(events[b.index], b.num_experts, H)
        torch.testing.assert_close(prof.novices("lsq")[row].double(), ref, **TOL)
    assert not torch.allclose(prof.novices("lsq"), prof.novices("mean"))  # the fit is not the mean


def test_lsq_checkpoint_equals_its_reference(setup, tmp_path):
    model, blocks, seqs, prof, d = setup
    plan = prof.plan("frequency", keep=2)  # 2 of 8 kept: six novices per layer
    events = _events(model, blocks, seqs)
    H = model.config.hidden_size
    controls = {}
    for b in blocks:
        n = _naive_lsq(events[b.index], b.num_experts, H).float()
        controls[b.index] = BlockControl(novices={i: n[i] for i in plan.replaced[b.layer]})
    with torch.no_grad(), patch_moe(model, blocks, controls=controls):
        ref = model(_ids(model), use_cache=False).logits
    out = tmp_path / "lsq"
    api.prune(d / "model", plan, out, mode="novice", profile=prof, novice="lsq")
    loaded = moeprune.load(out, dtype=torch.float32)
    with torch.no_grad():
        got = loaded(_ids(model), use_cache=False).logits
    torch.testing.assert_close(got, ref, **TOL)
    # the mean novices give another model: the option reaches the checkpoint
    api.prune(d / "model", plan, tmp_path / "mean", mode="novice", profile=prof)
    with torch.no_grad():
        other = moeprune.load(tmp_path / "mean", dtype=torch.float32)(_ids(model), use_cache=False).logits
    assert not torch.allclose(other, ref, **TOL)


def test_lsq_lowers_the_calibration_block_output_error(setup):
    model, blocks, seqs, prof, _ = setup
    events = _events(model, blocks, seqs)
    for keep in (2, 4, 6):
        plan = prof.plan("frequency", keep=keep)
        for row, b in enumerate(blocks):
            replaced = plan.replaced[b.layer]
            mean_err = _block_error(events[b.index], replaced, prof.novices("mean")[row])
            lsq_err = _block_error(events[b.index], replaced, prof.novices("lsq")[row])
            assert lsq_err < mean_err, (keep, b.layer, lsq_err, mean_err)
    # measured on the block's real output (first MoE layer, so its input is the same either way)
    b, row = blocks[0], 0
    plan = prof.plan("frequency", keep=2)
    block = model.get_submodule(b.path)

    def block_output(novices: torch.Tensor | None) -> torch.Tensor:
        outs = []
        hook = block.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        controls = {}
        if novices is not None:
            controls = {b.index: BlockControl(novices={i: novices[i] for i in plan.replaced[b.layer]})}
        try:
            with torch.no_grad(), patch_moe(model, blocks, controls=controls):
                for seq in seqs:
                    model(input_ids=torch.tensor([seq]), use_cache=False)
        finally:
            hook.remove()
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])

    full = block_output(None).double()
    mean_err = float((block_output(prof.novices("mean")[row]).double() - full).square().sum())
    lsq_err = float((block_output(prof.novices("lsq")[row]).double() - full).square().sum())
    assert lsq_err < mean_err


def test_old_profile_loads_and_refuses_lsq_in_one_line(setup, tmp_path, capsys):
    model, blocks, seqs, prof, d = setup
    old = Profile(meta=dict(prof.meta), tensors={k: v for k, v in prof.tensors.items() if k not in ("gate_sq", "novice_lsq")})
    path = tmp_path / "old.profile.safetensors"
    old.save(path)
    old = Profile.load(path)  # still a valid profile
    plan = old.plan("frequency", keep=2)
    plan.save(tmp_path / "plan.json")
    api.prune(d / "model", plan, tmp_path / "mean", mode="novice", profile=old)  # mean needs nothing new
    with pytest.raises(UserError, match="no least-squares novices"):
        api.prune(d / "model", plan, tmp_path / "lsq", mode="novice", profile=old, novice="lsq")
    rc, _, err = run_cli(
        capsys, "prune", d / "model", "--plan", tmp_path / "plan.json", "--mode", "novice",
        "--profile", path, "--novice", "lsq", "--out", tmp_path / "cli",
    )  # fmt: skip
    assert_user_error(rc, err, "least-squares novices", "moeprune profile")
    assert not (tmp_path / "cli").exists()
    rc, _, err = run_cli(
        capsys, "prune", d / "model", "--plan", tmp_path / "plan.json", "--novice", "lsq", "--out", tmp_path / "x"
    )
    assert_user_error(rc, err, "--novice lsq", "--mode novice")
    with pytest.raises(UserError, match="unknown novice fit"):
        prof.novices("median")


def test_merged_lsq_novices_equal_the_union(setup):
    model, blocks, seqs, prof, _ = setup
    parts = []
    for part in (seqs[:2], seqs[2:]):
        t = calibrate(model, part, blocks=blocks, batch_size=2)
        parts.append(
            Profile.build(
                t, model=prof.meta["model"], config=model.config, blocks=blocks, samples=len(part),
                data=[{"path": "x", "sha256": "0" * 64, "records": len(part)}], settings={},
            )
        )  # fmt: skip
    merged = Profile.merge(parts)
    torch.testing.assert_close(merged["gate_sq"], prof["gate_sq"], **TOL)
    torch.testing.assert_close(merged["novice_lsq"], prof["novice_lsq"], **TOL)
    # a merge with a profile that lacks them has none (mean novices still merge)
    old = Profile(meta=parts[1].meta, tensors={k: v for k, v in parts[1].tensors.items() if k not in ("gate_sq", "novice_lsq")})
    assert "novice_lsq" not in Profile.merge([parts[0], old]).tensors
