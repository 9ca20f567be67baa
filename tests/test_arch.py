"""The architecture layer reproduces every supported MoE type exactly (float32, tiny random models)."""

from __future__ import annotations

import pytest
import torch

from moeprune.arch import ARCH_TABLE, UNSUPPORTED, BlockControl, find_moe_blocks, llama4, patch_moe
from moeprune.errors import UserError
from moeprune.testing.tiny import buildable_types, tiny_model

SUPPORTED = [t for t in buildable_types() if t in ARCH_TABLE]
REFUSED = [t for t in buildable_types() if t in UNSUPPORTED]


def _inputs(model) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (2, 12), generator=g)


def test_every_buildable_type_is_classified():
    unclassified = [t for t in buildable_types() if t not in ARCH_TABLE and t not in UNSUPPORTED]
    assert unclassified == []


@pytest.fixture(scope="module", params=SUPPORTED)
def tiny(request):
    torch.manual_seed(0)
    model = tiny_model(request.param)
    return request.param, model, find_moe_blocks(model)


def test_blocks_found(tiny):
    model_type, model, blocks = tiny
    text = model.config.get_text_config()
    assert blocks, model_type
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert len({b.layer for b in blocks}) == len(blocks)
    for b in blocks:
        stored = b.experts(model).get_parameter(next(iter(b.layout.tensors))).shape[0]
        assert b.num_experts * b.layout.rows_per_expert == stored
        assert 1 <= b.top_k < b.num_experts
        router_w = model.get_parameter(b.router_weight_path)
        assert router_w.shape[0] == b.num_experts + b.router_extra
        # ZAYA's router is an MLP: its last linear reads the router width, not the hidden state
        assert router_w.shape[-1] == (getattr(text, "router_hidden_size", None) or text.hidden_size)


def test_router_semantics_reproduce_the_router(tiny):
    """route(spec, logits) gives the same experts and gate weights as the router's own forward."""
    model_type, model, blocks = tiny
    seen: dict[int, tuple] = {}
    hooks = []
    for b in blocks:

        def hook(_mod, args, out, _b=b, _model=model):
            if isinstance(out, torch.Tensor):  # logits only (DBRX): the block's method routes them
                weights, index = getattr(_b.block(_model), _b.route_method)(out)
                out = (out, weights, index)
            elif _b.spec.gate_site == "input":  # Llama-4: (scores [T, E], logits)
                index, weights = llama4.model_routing(out[0], out[1], _b.top_k)
                out = (out[1], weights, index)
            # the router's logits over all its columns (Gemma-4 returns probabilities, Inkling
            # its routed columns only: arch/extended.py)
            logits = _b.router_logits(_mod, args[0], out)
            seen[_b.index] = tuple(o.detach().clone() for o in (logits, *out[1:3]))

        hooks.append(b.router(model).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(_inputs(model), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert set(seen) == {b.index for b in blocks}
    for b in blocks:
        logits, weights, index = seen[b.index]
        r = b.route(model, logits)
        if b.spec.extra_role == "skip":  # ZAYA hands a chosen skip class on as expert 0, weight 0
            skip = r.top_k_index >= b.num_experts
            r.top_k_index, r.top_k_weights = r.top_k_index.masked_fill(skip, 0), r.top_k_weights.masked_fill(skip, 0)
        own_idx, own_order = index.sort(dim=-1)
        our_idx, our_order = r.top_k_index.sort(dim=-1)
        assert torch.equal(own_idx, our_idx), f"{model_type} layer {b.layer}: different experts"
        applied = weights.float()
        if b.spec.scaling_site == "block":
            applied = applied * b.spec.scaling
        torch.testing.assert_close(
            applied.gather(-1, own_order), r.top_k_weights.gather(-1, our_order), rtol=1e-5, atol=1e-6
        )


def test_rerouted_and_recomputed_blocks_reproduce_the_model(tiny):
    """With routing by route() and every expert output recomputed by moeprune, logits are unchanged."""
    model_type, model, blocks = tiny
    x = _inputs(model)
    events = []
    with torch.no_grad():
        reference = model(x, use_cache=False).logits
        with patch_moe(model, blocks, observer=events.append, reroute=True):
            ours = model(x, use_cache=False).logits
        again = model(x, use_cache=False).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, reference, rtol=0, atol=0)  # patches fully removed
    assert {e.block.index for e in events} == {b.index for b in blocks}
    for e in events:
        t = e.hidden.shape[0]
        assert e.expert_outputs.shape == (t, e.block.top_k, e.hidden.shape[-1])
        assert e.logits.shape == (t, e.block.num_experts + e.block.router_extra)
        if e.block.prenorm_path is not None:
            assert e.residual is not None and e.residual.shape == e.hidden.shape


def test_grouped_per_slot_outputs_equal_the_per_expert_loop(tiny, monkeypatch):
    """The grouped kernels and the per-expert loop give the same per-slot outputs (and logits),
    sentinel slots (index -1: zero experts / skip slots) included; where the grouped kernels do not
    apply (quantized, DBRX, Llama-4, per-expert norms) the loop is used."""
    from moeprune.arch import experts as X

    model_type, model, blocks = tiny
    x = _inputs(model)
    got = {}
    for kernels in ("grouped", "loop"):
        monkeypatch.setattr(X, "SLOT_KERNELS", kernels)
        events: list = []
        with torch.no_grad(), patch_moe(model, blocks, observer=events.append):
            logits = model(x, use_cache=False).logits
        got[kernels] = (logits, [e.expert_outputs for e in events])
        for e in events:  # the rows come grouped by expert, in the order `perm` says
            slots = e.slot_outputs
            if slots.perm is None:
                continue
            ids = slots.sorted_ids.long()
            real = ids[(ids >= 0) & (ids < e.block.num_experts)]
            assert bool((real[1:] >= real[:-1]).all())
            assert torch.equal(ids[: real.numel()], real)  # no-expert slots last
            kept = (ids >= 0) & (ids < e.block.num_experts)
            assert torch.equal(e.top_k_index.reshape(-1)[slots.perm].long()[kept], ids[kept])
    torch.testing.assert_close(got["grouped"][0], got["loop"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got["grouped"][1], got["loop"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the grouped path itself, on ids with sentinel slots
    module = blocks[0].experts(model)
    H = model.config.get_text_config().hidden_size
    hidden = torch.randn(6, H, generator=torch.Generator().manual_seed(2))
    idx = torch.randint(0, blocks[0].num_experts, (6, blocks[0].top_k), generator=torch.Generator().manual_seed(3))
    idx[1, 0] = -1
    monkeypatch.setattr(X, "SLOT_KERNELS", "loop")
    with torch.no_grad():
        loop = X.selected_expert_outputs(module, hidden, idx)
        assert torch.equal(loop[1, 0], torch.zeros(H))
        if X._groupable(module, hidden):
            grouped = X.grouped_expert_outputs(module, hidden, idx).slots()
            torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
            assert torch.equal(grouped[1, 0], torch.zeros(H))
            # "auto" takes the loop that sums as it goes for experts of LOOP_MIN_EXPERT_SIZE
            # weights or more on CPU, the grouped kernels for smaller ones
            monkeypatch.setattr(X, "SLOT_KERNELS", "auto")
            size = X._expert_size(module)
            assert size == sum(p.numel() for p in module.parameters() if p.dim() == 3) // blocks[0].num_experts
            monkeypatch.setattr(X, "LOOP_MIN_EXPERT_SIZE", size)
            assert X._use_grouped(module, hidden) is False
            monkeypatch.setattr(X, "LOOP_MIN_EXPERT_SIZE", size + 1)
            assert X._use_grouped(module, hidden) is True
            monkeypatch.setattr(X, "LOOP_MIN_EXPERT_SIZE", size)
            monkeypatch.setattr(X, "_groupable", lambda module, hidden: True)
            assert X._use_grouped(module, hidden.bfloat16()) is False
            assert X._use_eager_loop(module, hidden.bfloat16()) is True
            assert X._use_grouped(module, hidden) is False
            assert X._use_eager_loop(module, hidden) is True
            monkeypatch.setattr(X, "SLOT_KERNELS", "loop")
            assert X._use_eager_loop(module, hidden) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss"])
def test_large_experts_sum_as_stock_eager(model_type, dtype, monkeypatch):
    """On CPU, experts the loop computes (LOOP_MIN_EXPERT_SIZE weights or more) sum their weighted
    outputs as they go, as transformers' `eager` experts do: the patched forward's logits are the
    stock eager forward's bit for bit, and the per-slot rows the observer sees are the plain
    loop's (float32 and bfloat16)."""
    from moeprune.arch import experts as X

    model = tiny_model(model_type).to(dtype)
    blocks = find_moe_blocks(model)
    x = _inputs(model)
    monkeypatch.setattr(X, "LOOP_MIN_EXPERT_SIZE", 0)
    assert X._use_eager_loop(blocks[0].experts(model), torch.zeros(1, 1, dtype=dtype))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        stock = model(x, use_cache=False).logits
        model.set_experts_implementation("grouped_mm")
        events: list = []
        with patch_moe(model, blocks, observer=events.append):
            patched = model(x, use_cache=False).logits
        assert events and all(e.slot_outputs.summed is not None for e in events)
        monkeypatch.setattr(X, "SLOT_KERNELS", "loop")
        plain: list = []
        with patch_moe(model, blocks, observer=plain.append):
            model(x, use_cache=False)
    assert torch.equal(patched, stock)
    # the first MoE layer has the same input in both runs (later ones follow each run's sums)
    assert plain[0].slot_outputs.summed is None
    assert torch.equal(events[0].expert_outputs, plain[0].expert_outputs)


def test_rows_buffer_is_shared_only_when_the_observer_lets_go(monkeypatch):
    """An observer that promises to be done with the rows when it returns gets every layer's rows
    in one buffer (the same memory each call), with the values the default (a tensor per call)
    gives; by default each event keeps its own rows after the forward."""
    from moeprune.arch import experts as X

    model = tiny_model("qwen3_moe")
    blocks = find_moe_blocks(model)
    assert len(blocks) >= 2
    x = _inputs(model)
    monkeypatch.setattr(X, "LOOP_MIN_EXPERT_SIZE", 0)  # the per-expert loop, which writes the rows

    def run(keeps: bool) -> tuple[torch.Tensor, list, list]:
        events: list = []
        seen: list = []

        def observe(event) -> None:
            events.append(event)
            seen.append((event.slot_outputs.rows.data_ptr(), event.slot_outputs.rows.clone()))

        with torch.no_grad(), patch_moe(model, blocks, observer=observe, observer_keeps_rows=keeps) as session:
            logits = model(x, use_cache=False).logits
        assert session.reuse_rows is not keeps
        return logits, events, seen

    own_logits, own_events, own_seen = run(True)
    shared_logits, _, shared_seen = run(False)
    assert torch.equal(own_logits, shared_logits)
    assert len({ptr for ptr, _ in shared_seen}) == 1
    assert len({ptr for ptr, _ in own_seen}) == len(own_seen)
    for event, (_, rows), (_, shared_rows) in zip(own_events, own_seen, shared_seen, strict=True):
        assert torch.equal(event.slot_outputs.rows, rows)  # still there after the forward
        assert torch.equal(shared_rows, rows)
    # the buffer grows for a larger call; the rows must fit it exactly
    from moeprune.arch.patch import PatchSession

    session = PatchSession(blocks=blocks, reuse_rows=True)
    like = torch.zeros(2, 8)
    small, large = session.rows_buffer(3, like), session.rows_buffer(5, like)
    assert small.shape == (3, 8) and large.shape == (5, 8) and session.rows_buffer(4, like).data_ptr() == large.data_ptr()
    assert PatchSession(blocks=blocks).rows_buffer(3, like) is None
    module = blocks[0].experts(model)
    H = model.config.get_text_config().hidden_size
    with pytest.raises(ValueError, match="out must be"):
        X.expert_slot_outputs(module, torch.zeros(2, H), torch.zeros(2, blocks[0].top_k, dtype=torch.long), out=torch.zeros(3, H))


def test_masked_stock_forward_shows_the_experts_only_the_kept_ones(tiny, monkeypatch):
    """Under a mask its router routes within the kept experts, the experts module's own forward
    sees only those, moved in front of its tensors in place: the logits are the ones it gives over
    all E, bit for bit, and every weight, parameter object and expert count is back after the
    session, an error inside it too."""
    from moeprune.arch import patch as P
    from moeprune.arch.compact import KeptExperts, compactable
    from moeprune.arch.routing import kept_view_problem

    model_type, model, blocks = tiny
    x = _inputs(model)
    E = blocks[0].num_experts
    allowed = torch.ones(E, dtype=torch.bool)
    allowed[:: E // max(blocks[0].spec.n_group, 1)] = False  # one expert per group
    controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    counts = {b.index: b.experts(model).num_experts for b in blocks if hasattr(b.experts(model), "num_experts")}
    expected = [
        b.index
        for b in blocks
        if compactable(b.experts(model))
        and b.experts(model).num_experts == b.num_experts
        and kept_view_problem(b.spec, allowed) is None
        and not b.router_extra
    ]
    applied: list = []
    apply = KeptExperts.apply
    monkeypatch.setattr(KeptExperts, "apply", lambda self: (applied.append(self), apply(self))[1])

    def unchanged() -> None:
        assert dict(model.named_parameters()).keys() == params.keys()
        assert all(p is params[n] for n, p in model.named_parameters())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert {i: blocks[i].experts(model).num_experts for i in counts} == counts

    with torch.no_grad():
        with patch_moe(model, blocks, controls=controls, stock_experts=True):
            front = model(x, use_cache=False).logits
            again = model(x, use_cache=False).logits  # the kept experts stay in front
        assert len(applied) == len(expected)
        unchanged()
        with monkeypatch.context() as m:
            m.setattr(P, "compactable", lambda module: False)
            with patch_moe(model, blocks, controls=controls, stock_experts=True):
                whole = model(x, use_cache=False).logits
        with pytest.raises(KeyboardInterrupt), patch_moe(model, blocks, controls=controls, stock_experts=True):
            model(x, use_cache=False)
            raise KeyboardInterrupt
    unchanged()
    assert torch.equal(front, whole) and torch.equal(again, whole)
    if model_type in ("qwen3_moe", "deepseek_v3", "mixtral", "gpt_oss", "olmoe"):
        assert expected  # the common layouts take it


def test_masking_forbids_experts(tiny):
    model_type, model, blocks = tiny
    x = _inputs(model)
    forbidden = torch.zeros(blocks[0].num_experts, dtype=torch.bool)
    spec = blocks[0].spec
    # forbid one expert per group, keeping every group able to route
    per_group = blocks[0].num_experts // max(spec.n_group, 1)
    forbidden[::per_group] = True
    allowed = ~forbidden
    chosen = []
    with torch.no_grad():
        reference = model(x, use_cache=False).logits
        controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
        with patch_moe(model, blocks, observer=lambda e: chosen.append(e.top_k_index), controls=controls):
            masked = model(x, use_cache=False).logits
    assert chosen and all(not forbidden[idx].any() for idx in chosen)
    assert not torch.allclose(masked, reference)


def test_stock_experts_under_a_masked_router_equal_the_per_slot_forward(tiny):
    """`compare`'s fast path (the experts module's own forward, router steered; novices as
    gate-weighted constants) gives the logits of moeprune's per-slot forward, for masks and novices."""
    model_type, model, blocks = tiny
    x = _inputs(model)
    E, H = blocks[0].num_experts, model.config.get_text_config().hidden_size
    per_group = E // max(blocks[0].spec.n_group, 1)
    allowed = torch.ones(E, dtype=torch.bool)
    allowed[::per_group] = False  # one expert per group: every group can still route
    g = torch.Generator().manual_seed(3)
    novices = {i: torch.randn(H, generator=g) for i in range(0, E, 2)}
    for controls in (
        {b.index: BlockControl(allowed=allowed) for b in blocks},
        {b.index: BlockControl(novices=novices) for b in blocks},
        {b.index: BlockControl(allowed=allowed, novices=novices) for b in blocks},
    ):
        with torch.no_grad():
            with patch_moe(model, blocks, controls=controls):
                slots = model(x, use_cache=False).logits
            with patch_moe(model, blocks, controls=controls, stock_experts=True):
                stock = model(x, use_cache=False).logits
        torch.testing.assert_close(stock, slots, rtol=1e-5, atol=1e-5)
    # one session, its novices swapped between forwards (as compare's rows do): the novices' table
    # the stock path keeps between forwards follows the new ones, never the old
    other = {i: torch.randn(H, generator=g) for i in range(1, E, 2)}
    with torch.no_grad():
        with patch_moe(model, blocks, controls={b.index: BlockControl(novices=other) for b in blocks}):
            want = model(x, use_cache=False).logits
        with patch_moe(model, blocks, stock_experts=True) as session:
            for novs in (novices, other):
                session.controls = {b.index: BlockControl(novices=novs) for b in blocks}
                got = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError), patch_moe(model, blocks, observer=print, stock_experts=True):
        pass


@pytest.mark.parametrize("model_type", REFUSED)
def test_unsupported_types_are_refused_clearly(model_type):
    model = tiny_model(model_type)
    with pytest.raises(UserError, match="not supported"):
        find_moe_blocks(model)


def test_dense_model_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
    )
    with pytest.raises(UserError, match="dense"):
        find_moe_blocks(AutoModelForCausalLM.from_config(cfg))


def test_architectures_doc_lists_every_type():
    """docs/architectures.md is regenerated whenever the table changes (scripts/gen_architectures_doc.py)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    for model_type in list(ARCH_TABLE) + list(UNSUPPORTED):
        assert f" {model_type}" in doc, model_type
    assert f"Supported ({len(ARCH_TABLE)} types)" in doc
    assert f"Not supported ({len(UNSUPPORTED)} types)" in doc


def test_steered_stock_evaluation_skips_the_routers_own_routing():
    """Where the table knows how a router computes its logits (DeepSeek-V3, Qwen3-MoE), a masked
    stock evaluation computes only them: the router's own forward never runs, and the logits are
    those of the per-slot forward, which runs it (a family without the entry, Mixtral, still runs it)."""
    for model_type, expect_calls in (("deepseek_v3", False), ("qwen3_moe", False), ("mixtral", True)):
        model = tiny_model(model_type).eval()
        blocks = find_moe_blocks(model)
        assert (blocks[0].logits_only is not None) is not expect_calls
        E = blocks[0].num_experts
        allowed = torch.ones(E, dtype=torch.bool)
        allowed[:: E // max(blocks[0].spec.n_group, 1)] = False
        controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
        x = _inputs(model)
        calls = []
        for b in blocks:
            router = b.router(model)
            own = router.forward
            router.forward = lambda *a, _own=own, _calls=calls, **k: _calls.append(1) or _own(*a, **k)
        with torch.no_grad():
            with patch_moe(model, blocks, controls=controls):
                slots = model(x, use_cache=False).logits
            assert calls, "the per-slot path runs the router's own forward"
            calls.clear()
            with patch_moe(model, blocks, controls=controls, stock_experts=True):
                stock = model(x, use_cache=False).logits
        assert bool(calls) is expect_calls, model_type
        torch.testing.assert_close(stock, slots, rtol=1e-5, atol=1e-5)


LOGITS_ONLY = sorted(t for t, facts in ARCH_TABLE.items() if facts.logits_only is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_type", LOGITS_ONLY)
def test_logits_only_entries_compute_what_the_router_computes(model_type, dtype):
    """Each table entry that lets a steered stock evaluation skip the router's own routing
    (ArchFacts.logits_only) computes the router's logits bit for bit, and the steered router hands
    the block weights and ids of the dtypes the router's own forward returns, with the same values
    when nothing is masked (float32 and bfloat16 models)."""
    model = tiny_model(model_type).to(dtype)
    blocks = find_moe_blocks(model)
    block = blocks[0]
    router = block.router(model)
    h = torch.randn(3, 5, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        own = router(h)
        assert torch.equal(block.logits_only(router, h, None), own[0])
        every = torch.ones(block.num_experts, dtype=torch.bool)
        with patch_moe(model, blocks, controls={block.index: BlockControl(allowed=every)}, stock_experts=True):
            steered = router(h)
    assert len(steered) == len(own)
    assert [t.dtype for t in steered] == [t.dtype for t in own]
    torch.testing.assert_close(steered[0], own[0], rtol=0, atol=0)
    ids, order = steered[2].sort(dim=-1)
    own_ids, own_order = own[2].sort(dim=-1)
    assert torch.equal(ids, own_ids)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(steered[1].gather(-1, order), own[1].gather(-1, own_order), rtol=tol, atol=tol)


def test_ctrl_c_while_the_kept_experts_move_leaves_the_model_whole(monkeypatch):
    """A SIGINT that arrives while the kept experts are swapped in front (or back) waits until the
    swaps are done, then ends the session as KeyboardInterrupt: every weight is back."""
    import os
    import signal

    from moeprune.arch import compact

    model = tiny_model("qwen3_moe")
    blocks = find_moe_blocks(model)
    E = blocks[0].num_experts
    allowed = torch.zeros(E, dtype=torch.bool)
    allowed[1::2] = True  # every kept expert moves
    controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap_rows = compact._swap_rows
    calls: list[int] = []

    def interrupted(t, swaps):  # Ctrl-C in the middle of the first tensor's swaps
        if not calls:
            half = len(swaps) // 2
            swap_rows(t, swaps[:half])
            os.kill(os.getpid(), signal.SIGINT)
            swap_rows(t, swaps[half:])
        else:
            swap_rows(t, swaps)
        calls.append(len(swaps))

    monkeypatch.setattr(compact, "_swap_rows", interrupted)
    with (
        torch.no_grad(),
        pytest.raises(KeyboardInterrupt),
        patch_moe(model, blocks, controls=controls, stock_experts=True),
    ):
        model(_inputs(model), use_cache=False)
    assert len(calls) >= 4  # the interrupted apply finished, and everything was swapped back
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert blocks[0].experts(model).num_experts == E


def test_an_experts_module_shared_by_two_blocks_keeps_all_its_experts(monkeypatch):
    """A looped model runs one experts module for several blocks, each with its own mask: that
    module is never moved (each block's mask would move it its own way)."""
    import dataclasses

    from moeprune.arch.compact import KeptExperts

    model = tiny_model("qwen3_moe")
    blocks = find_moe_blocks(model)
    twin = dataclasses.replace(blocks[1], experts_path=blocks[0].experts_path)
    assert twin.experts(model) is blocks[0].experts(model)
    E = blocks[0].num_experts
    allowed = torch.ones(E, dtype=torch.bool)
    allowed[::2] = False
    applied: list = []
    apply = KeptExperts.apply
    monkeypatch.setattr(KeptExperts, "apply", lambda self: (applied.append(self.module), apply(self))[1])
    with torch.no_grad():
        with patch_moe(model, [blocks[0], twin], controls={0: BlockControl(allowed=allowed)}, stock_experts=True):
            model(_inputs(model), use_cache=False)
        assert applied == []
        with patch_moe(model, blocks, controls={0: BlockControl(allowed=allowed)}, stock_experts=True):
            model(_inputs(model), use_cache=False)
    assert applied == [blocks[0].experts(model)]
