"""Llama-4, beyond the parametrized architecture tests: the gate scales the experts' input and the
model runs every expert densely. Unchosen experts add exactly 0, masking a logit equals removing the
router row, the recorded (g, e) pairs rebuild the block's routed output exactly (g * e = E(g x)), and
the novice checkpoint and pad-uniform are refused with one line."""

from __future__ import annotations

import pytest
import torch

from moeprune.arch import find_moe_blocks, kept_controls, patch_moe
from moeprune.arch.llama4 import single_expert_forward
from moeprune.errors import UserError
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import tiny_model


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama4():
    model = tiny_model("llama4_text")
    return model, find_moe_blocks(model)


def test_unchosen_experts_add_exactly_zero(llama4):
    """The premise of treating the dense bmm as a sparse MoE: E(0 * x) = 0 for every expert."""
    model, blocks = llama4
    experts = blocks[0].experts(model)
    zero = torch.zeros(3, 64)
    for i in range(blocks[0].num_experts):
        assert torch.equal(single_expert_forward(experts, i, zero), torch.zeros(3, 64))


def test_masking_equals_removing_router_rows(llama4):
    """route() with forbidden experts = the model's own router on the kept rows only."""
    model, blocks = llama4
    router = blocks[0].router(model)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    kept = [0, 2, 3, 6, 7]
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[kept] = True
    with torch.no_grad():
        _, logits = router(x)
        small = torch.nn.Linear(64, len(kept), bias=False)
        small.weight.copy_(router.weight[kept])
        small_logits = small(x)
    r = blocks[0].route(model, logits, allowed=allowed)
    top = torch.topk(small_logits, 2, dim=1)
    assert torch.equal(r.top_k_index, torch.tensor(kept)[top.indices])
    torch.testing.assert_close(r.top_k_weights, torch.sigmoid(top.values), rtol=1e-6, atol=1e-6)


def test_recorded_gate_and_outputs_rebuild_the_routed_output(llama4):
    """sum_k g * e over the recorded pairs = the block output minus its shared expert."""
    model, blocks = llama4
    b = blocks[0]
    block = b.block(model)
    seen, outs, ins = [], [], []
    def grab(_m, args, out) -> None:
        ins.append(args[0])
        outs.append(out[0])

    hook = block.register_forward_hook(grab)
    try:
        with torch.no_grad(), patch_moe(model, blocks, observer=seen.append):
            model(_ids(), use_cache=False)
    finally:
        hook.remove()
    (event,) = seen
    with torch.no_grad():
        shared = block.shared_expert(ins[0].reshape(-1, 64))
    routed = (event.top_k_weights.unsqueeze(-1) * event.expert_outputs).sum(1)
    torch.testing.assert_close(routed + shared, outs[0].reshape(-1, 64), rtol=1e-5, atol=1e-6)
    # the gate is the router's sigmoid (not 1): the soft-activation score differs from the frequency
    assert bool((event.top_k_weights < 1).all()) and bool((event.top_k_weights > 0).all())
    x, g, i = event.hidden[0:1], float(event.top_k_weights[0, 0]), int(event.top_k_index[0, 0])
    with torch.no_grad():
        expected = single_expert_forward(b.experts(model), i, g * x)[0] / g
    torch.testing.assert_close(event.expert_outputs[0, 0], expected, rtol=1e-5, atol=1e-6)


def test_composite_config_prunes_exactly(tmp_path):
    """A llama4 (composite) config.json: the counts live in text_config."""
    import json

    from transformers import AutoModelForCausalLM

    model = tiny_model("llama4")
    blocks = find_moe_blocks(model)
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [1, 2, 4, 7] for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, top_k=1)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    assert text["num_local_experts"] == 4 and text["num_experts_per_tok"] == 1
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        ours = pruned(_ids(), use_cache=False).logits
        with patch_moe(model, blocks, controls=kept_controls(blocks, kept, top_k=1)):
            ref = model(_ids(), use_cache=False).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_novice_checkpoint_and_pad_uniform_are_refused(llama4, tmp_path):
    model, blocks = llama4
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [0, 1, 2, 3] for b in blocks}
    novices = {b.layer: torch.zeros(4, 64) for b in blocks}
    with pytest.raises(UserError, match="receives only the score-scaled inputs"):
        rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
    with pytest.raises(UserError, match="no additive selection bias"):
        rewrite_checkpoint(tmp_path / "src", tmp_path / "out", {b.layer: [0, 1, 2][: 2 + b.index] for b in blocks},
                           pad_uniform=True)
    assert not (tmp_path / "out").exists()


def test_novices_evaluate_in_memory(llama4):
    """A novice constant c adds g * c (what compare --novice evaluates)."""
    from moeprune.arch import BlockControl

    model, blocks = llama4
    c = torch.randn(64, generator=torch.Generator().manual_seed(3))
    seen = []
    controls = {b.index: BlockControl(novices={i: c for i in range(8)}) for b in blocks}
    with torch.no_grad(), patch_moe(model, blocks, observer=seen.append, controls=controls):
        model(_ids(), use_cache=False)
    for ev in seen:
        torch.testing.assert_close(ev.expert_outputs, c.expand_as(ev.expert_outputs), rtol=1e-5, atol=1e-6)
