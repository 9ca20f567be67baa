"""Checkpoint checks shared by the surgery and architecture tests: every pruned checkpoint (uniform,
ragged, novice), the adaptive model and the layer-by-layer profile are compared with the original
model steered by ``patch_moe`` (masked routing, or constant novice outputs) on the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moeprune
from _reference import assert_same
from moeprune.adaptive import AdaptiveMoE
from moeprune.arch import BlockControl, kept_controls, patch_moe
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.offload import calibrate_sequential
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import byte_tokenizer

TOL = {"rtol": 1e-5, "atol": 1e-5}


def tiny_ids(model) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def run_logits(model, **patch) -> torch.Tensor:
    """The logits on `tiny_ids`, under ``patch_moe(model, **patch)`` if given."""
    with torch.no_grad():
        if not patch:
            return model(tiny_ids(model), use_cache=False).logits
        with patch_moe(model, **patch):
            return model(tiny_ids(model), use_cache=False).logits


def masked_logits(model, blocks, kept: dict[int, list[int]]) -> torch.Tensor:
    return run_logits(model, blocks=blocks, controls=kept_controls(blocks, kept))


def two_removed(blocks) -> dict[int, list[int]]:
    """Two experts removed per layer, different ones in different layers."""
    return {
        b.layer: sorted(set(range(b.num_experts)) - {b.layer % b.num_experts, (3 * b.layer + 5) % b.num_experts})
        for b in blocks
    }


def ragged_plan(blocks, seed: int = 0) -> dict[int, list[int]]:
    """Different counts per layer (6, 4, 3, ... or 3, 2, 4 per routing group), different experts."""
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    for j, b in enumerate(blocks):
        e, g = b.num_experts, b.spec.n_group
        if g > 1:
            size = e // g
            per = (3, 2, 4)[j % 3]
            ids = [grp * size + int(i) for grp in range(g) for i in torch.randperm(size, generator=gen)[:per]]
        else:
            ids = torch.randperm(e, generator=gen)[: (6, 4, 3)[j % 3]].tolist()
        kept[b.layer] = sorted(ids)
    return kept


def random_novices(blocks, kept, hidden: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        b.layer: torch.randn(b.num_experts - len(kept[b.layer]), hidden, generator=gen) * 0.5 for b in blocks
    }


def novice_logits(model, blocks, kept, novices) -> torch.Tensor:
    controls = {}
    for b in blocks:
        replaced = sorted(set(range(b.num_experts)) - set(kept[b.layer]))
        controls[b.index] = BlockControl(novices=dict(zip(replaced, novices[b.layer], strict=True)))
    return run_logits(model, blocks=blocks, controls=controls)


def save(model, path: Path, layout: str) -> Path:
    """The model as a checkpoint with a tokenizer: ``hub`` in the published key layout."""
    model.save_pretrained(path, save_original_format=(layout == "hub"))
    byte_tokenizer().save_pretrained(path)
    return path


def load_stock(path: Path):
    """The checkpoint as plain transformers loads it: every key used, none missing."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[what], (what, info[what])
    return model.eval()


def tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a checkpoint, read from its shard."""
    from safetensors import safe_open

    ckpt = Checkpoint.open(path)
    with safe_open(str(path / ckpt.tensors[key].file), "pt") as f:
        return f.get_tensor(key)


# --- the checks ------------------------------------------------------------------------------------


def check_ragged_loads_exactly(model, blocks, tmp_path: Path) -> None:
    src = save(model, tmp_path / "src", "hub")
    kept = ragged_plan(blocks)
    assert len({len(v) for v in kept.values()}) > 1
    rewrite_checkpoint(src, tmp_path / "out", kept)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(run_logits(loaded), masked_logits(model, blocks, kept), **TOL)


def check_novice_loads_exactly(model, blocks, tmp_path: Path) -> None:
    src = save(model, tmp_path / "src", "hub")
    kept = ragged_plan(blocks, seed=11)
    novices = random_novices(blocks, kept, model.config.get_text_config().hidden_size)
    rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(run_logits(loaded), novice_logits(model, blocks, kept, novices), **TOL)


def check_adaptive_equals_pruned(model, blocks, tmp_path: Path) -> AdaptiveMoE:
    """An adaptive model over two patterns, switched back and forth, equals each pruned checkpoint."""
    from test_adaptive import _library

    src = save(model, tmp_path / "src", "hub")
    a = two_removed(blocks)
    e = blocks[0].num_experts
    b = {layer: sorted(set(range(e)) - {(layer + 2) % e, (layer + 6) % e}) for layer in a}
    lib = _library(model, blocks, {"a": a, "b": b})
    am = AdaptiveMoE.from_library(src, lib, dtype="float32", task="a")
    for name in ("b", "a"):
        rewrite_checkpoint(src, tmp_path / f"pruned-{name}", lib.task(name).plan.kept)
        pruned = load_stock(tmp_path / f"pruned-{name}")
        am.activate(name)
        # every parameter is bit-equal, but torch's CPU grouped_mm rounds the last bit by address
        torch.testing.assert_close(run_logits(am.model), run_logits(pruned), rtol=1e-6, atol=1e-6)
    return am


def check_layer_by_layer_profile(path: Path, reference, differs_from=None) -> None:
    """The layer-by-layer profile (one decoder layer in memory) of the checkpoint at `path`
    equals the whole-model profile of the loaded model `reference`, and not that of
    `differs_from` if given (a model that routes differently)."""
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(4, 256, (n,), generator=g).tolist() for n in (7, 1, 20, 3)]
    kwargs = {"batch_size": 2, "pad_id": 0, "premoe_ka": 3, "per_sample": True}
    got = calibrate_sequential(path, seqs, **kwargs)
    assert_same(got, calibrate(reference, seqs, **kwargs))
    if differs_from is not None:
        with pytest.raises(AssertionError):
            assert_same(got, calibrate(differs_from, seqs, **kwargs))


def plan_for(config, blocks, kept_ids: dict[int, list[int]], **over):
    """A removal plan for the model of ``config`` and its MoE ``blocks`` keeping ``kept_ids``, as
    `moeprune plan` writes one (``over``: fields to replace or add)."""
    from moeprune.identity import fingerprint_fields, model_fingerprint
    from moeprune.plan import Plan

    fields = {
        "model_fingerprint": model_fingerprint(fingerprint_fields(config, blocks)),
        "model_type": config.model_type,
        "layers": sorted(kept_ids),
        "num_experts": blocks[0].num_experts,
        "top_k": blocks[0].top_k,
        "method": "frequency",
        "kept": kept_ids,
    }
    fields.update(over)
    return Plan(**fields)
