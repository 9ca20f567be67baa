"""Every MoE causal-LM type of transformers builds as a tiny random model and runs a forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moeprune.testing.tiny import (
    MOE_CAUSAL_LM_TYPES,
    NEEDS_NO_CACHE,
    TYPES_FROM_TRANSFORMERS,
    UNBUILDABLE,
    VOCAB,
    buildable_types,
    find_moe_causal_lm_types,
    tiny_config,
    tiny_model,
)

MAX_PARAMS = 2_000_000


def _selected_experts(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list]:
    """Hook every @use_experts_implementation experts module to record the expert ids it runs."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if not hasattr(type(mod), "_apply_gate"):
            continue

        def hook(mod, args, kwargs, name=name):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            seen[name] = index.detach().clone()

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


@pytest.mark.parametrize("model_type", buildable_types())
def test_tiny_model_forward(model_type: str) -> None:
    model = tiny_model(model_type)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < MAX_PARAMS, f"{model_type}: {n_params:,} parameters"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    seen, handles = _selected_experts(model)
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    kwargs = {"use_cache": False} if model_type in NEEDS_NO_CACHE else {}
    with torch.no_grad():
        logits = model(input_ids, **kwargs).logits
    for h in handles:
        h.remove()

    assert logits.shape == (2, 16, VOCAB)
    assert torch.isfinite(logits).all()
    # randomised routers: every hooked MoE layer spreads the 32 tokens over several experts
    for name, index in seen.items():
        assert index.unique().numel() >= 2, f"{model_type}: {name} routes every token to one expert"


def test_tiny_models_are_seeded() -> None:
    a, b = tiny_model("qwen3_moe", seed=3), tiny_model("qwen3_moe", seed=3)
    c = tiny_model("qwen3_moe", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_lists_are_consistent() -> None:
    assert len(set(MOE_CAUSAL_LM_TYPES)) == len(MOE_CAUSAL_LM_TYPES)
    assert set(UNBUILDABLE) <= set(MOE_CAUSAL_LM_TYPES)
    assert set(buildable_types()) == set(MOE_CAUSAL_LM_TYPES) - set(UNBUILDABLE)


def _pinned(package: str) -> str:
    path = Path(__file__).resolve().parents[1] / "constraints.txt"
    pins = dict(
        line.split("==", 1) for line in path.read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    return pins[package]


def test_type_list_is_made_from_the_pinned_transformers() -> None:
    assert _pinned("transformers") == TYPES_FROM_TRANSFORMERS


def test_size_fields_fit_the_tiny_model() -> None:
    # a new config default (transformers 5.25: inkling2's unpadded_vocab_size 200058) must be
    # capped by the generic rule, not left at full size
    for model_type in buildable_types():
        cfg = tiny_config(model_type).get_text_config()
        for name, value in cfg.to_dict().items():
            if isinstance(value, int) and not isinstance(value, bool):
                if "vocab" in name and "divisible" not in name:
                    assert value <= VOCAB, (model_type, name, value)
                if "intermediate_size" in name:
                    assert value <= 128, (model_type, name, value)


@pytest.mark.skipif(
    transformers.__version__ != TYPES_FROM_TRANSFORMERS,
    reason=f"MOE_CAUSAL_LM_TYPES was made from transformers {TYPES_FROM_TRANSFORMERS} (the pinned one); "
    "this run uses another (MOEPRUNE_NEWEST)",
)
def test_type_list_matches_installed_transformers() -> None:
    found, failures = find_moe_causal_lm_types()
    assert found == MOE_CAUSAL_LM_TYPES
    assert not failures
