"""The rewrite planned from config.json and the shard headers (arch/header_keys.py) equals the
rewrite planned on the model built on the meta device, on every family the header map knows, in
fused and hub layouts; anything it does not know falls back to the model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

import moeprune.arch.header_keys as header_keys
from _checkpoints import plan_for
from _cli import run_cli_fresh
from moeprune.arch import find_moe_blocks
from moeprune.arch.header_keys import FAMILIES, header_key_map
from moeprune.arch.keys import map_expert_keys
from moeprune.checkpoint import Checkpoint
from moeprune.modelio import build_on_meta, load_config
from moeprune.surgery import mtp_keys, plan_rewrite
from moeprune.testing.tiny import tiny_model

CASES = [(t, layout) for t in sorted(FAMILIES) for layout in ("fused", "hub")]
FIRST_DENSE = {"deepseek_v3", "glm4_moe"}  # their first MoE layer follows first_k_dense_replace dense ones
HUB_PER_EXPERT = {"deepseek_v3", "glm4_moe", "qwen3_moe", "qwen2_moe", "olmoe", "mixtral"}  # gpt-oss is fused on the hub


@cache
def _saved(model_type: str, layout: str, root: str, overrides: str = "{}") -> Path:
    path = Path(root) / f"{model_type}-{layout}-{abs(hash(overrides))}"
    tiny_model(model_type, **json.loads(overrides)).save_pretrained(
        path, save_original_format=(layout == "hub")
    )
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("header-keys"))


def _kept(blocks) -> dict[int, list[int]]:
    """6 of 8 experts, different per layer, the same number from every routing group."""
    kept = {}
    for b in blocks:
        e, g = b.num_experts, b.spec.n_group
        size = e // g
        drop = (
            {grp * size + (b.layer + grp) % size for grp in range(g)}
            if g > 1
            else {b.layer % e, (3 * b.layer + 5) % e}
        )
        if g == 1 and len(drop) < 2:
            drop.add((b.layer + 1) % e)
        kept[b.layer] = sorted(set(range(e)) - drop)
    return kept


def _model_map(path: Path):
    config = load_config(str(path))
    model = build_on_meta(config)
    blocks = find_moe_blocks(model)
    return config, blocks, map_expert_keys(model, blocks, Checkpoint.open(path).shapes())


def _plans(path: Path, monkeypatch, **kwargs):
    via_headers = plan_rewrite(path, path / "out", **kwargs)
    with monkeypatch.context() as m:
        m.setattr(header_keys, "header_key_map", lambda *a, **k: None)
        via_model = plan_rewrite(path, path / "out", **kwargs)
    return via_headers, via_model


# which decoder layers are MoE: set by config names the header map reads too
LAYER_CASES = [
    ("qwen3_moe", "hub", {"mlp_only_layers": [0]}),
    ("qwen2_moe", "fused", {"decoder_sparse_step": 2}),
    ("deepseek_v3", "fused", {"first_k_dense_replace": 0}),
    ("glm4_moe", "hub", {"first_k_dense_replace": 0, "use_qk_norm": True, "attention_bias": True}),
]


@pytest.mark.parametrize("model_type, layout, overrides", [(t, lay, {}) for t, lay in CASES] + LAYER_CASES)
def test_header_map_equals_model_map(model_type, layout, overrides, root, monkeypatch):
    path = _saved(model_type, layout, root, json.dumps(overrides))
    config, blocks, model_map = _model_map(path)
    ckpt = Checkpoint.open(path)
    if layout == "hub" and model_type in HUB_PER_EXPERT:
        assert any(k.kind == "per_expert" for k in model_map.keys.values()), "not saved one key per expert"
    mine = header_key_map(
        config, ckpt.shapes(), mtp_keys(ckpt.tensors, json.loads((path / "config.json").read_text()))
    )
    assert mine is not None, f"{model_type} {layout}: the header map gave up"
    assert mine.keys == model_map.keys
    assert not model_map.stray
    fields = (
        "index",
        "layer",
        "path",
        "experts_path",
        "num_experts",
        "top_k",
        "spec",
        "selection_bias_path",
        "router_weight_path",
        "router_extra",
        "router_tensors",
    )
    for a, b in zip(mine.blocks, blocks, strict=True):
        assert {f: getattr(a, f) for f in fields} == {f: getattr(b, f) for f in fields}

    kept = _kept(blocks)
    for top_k in (None, 1) if blocks[0].spec.selector != "sparsemixer" else (None,):
        k = top_k if top_k is None else min(top_k, blocks[0].top_k)
        fast, slow = _plans(path, monkeypatch, kept=kept, top_k=k, max_shard_size=40_000)
        assert fast.from_headers and not slow.from_headers
        assert [dataclasses.astuple(t) for t in fast.tensors] == [
            dataclasses.astuple(t) for t in slow.tensors
        ]
        assert [[t.key for t in s] for s in fast.shards] == [[t.key for t in s] for s in slow.shards]
        assert fast.names == slow.names and len(fast.names) > 1
        assert fast.new_config == slow.new_config
        assert fast.layout == slow.layout and fast.kept == slow.kept
        assert dataclasses.asdict(fast.result) == dataclasses.asdict(slow.result)


@pytest.mark.parametrize("model_type, layout", CASES)
def test_header_pad_uniform_equals_model_pad_uniform(model_type, layout, root, monkeypatch):
    """`--pad-uniform` (a removal padded with dead experts) planned from the headers writes what
    the model path writes, generated dead selection biases included; a family whose router has
    no selection bias is refused by both with the same line."""
    from moeprune.errors import UserError

    # two MoE layers, so that the one that keeps fewer experts is padded to the other's count
    overrides = {"first_k_dense_replace": 0} if model_type in FIRST_DENSE else {}
    path = _saved(model_type, layout, root, json.dumps(overrides))
    _, blocks, _ = _model_map(path)
    assert len(blocks) > 1
    kept = _kept(blocks)
    first, groups = blocks[0], max(1, blocks[0].spec.n_group)
    size = first.num_experts // groups
    for g in range(groups):  # the first layer keeps one fewer per routing group: it is padded
        kept[first.layer].remove(max(e for e in kept[first.layer] if e // size == g))
    try:
        fast, slow = _plans(path, monkeypatch, kept=kept, pad_uniform=True)
    except UserError as exc:
        assert "--pad-uniform cannot pad" in str(exc)
        with monkeypatch.context() as m, pytest.raises(UserError) as slow_exc:
            m.setattr(header_keys, "header_key_map", lambda *a, **k: None)
            plan_rewrite(path, path / "out", kept=kept, pad_uniform=True)
        assert str(slow_exc.value) == str(exc)
        assert blocks[0].selection_bias_path is None or blocks[0].spec.score_fn == "softmax"
        return
    assert blocks[0].selection_bias_path is not None
    assert fast.from_headers and not slow.from_headers
    assert fast.result.padded and fast.layout.dead_experts
    assert [dataclasses.astuple(t) for t in fast.tensors] == [dataclasses.astuple(t) for t in slow.tensors]
    assert fast.new_config == slow.new_config and fast.layout == slow.layout
    assert dataclasses.asdict(fast.result) == dataclasses.asdict(slow.result)


def test_unknown_keys_fall_back_to_the_model(root):
    """A key the header map has no rule for (a stray tensor, an unknown attention module) gives
    None: the model path then checks it (and refuses a stray tensor, tests/test_hostile.py)."""
    path = _saved("qwen3_moe", "hub", root)
    config = load_config(str(path))
    shapes = dict(Checkpoint.open(path).shapes())
    assert header_key_map(config, shapes, set()) is not None
    for extra in (
        "extra_weight",
        "model.layers.0.self_attn.extra.weight",
        "model.layers.1.mlp.experts.8.up_proj.weight",
        "model.layers.1.mlp.shared_expert.gate_proj.weight",
        "model.layers.9.mlp.gate.weight",
        "model.layers.0.self_attn.q_proj.bias",  # attention_bias is false
        "model.layers.0.self_attn.q_norm.bias",
        "model.layers.1.mlp.gate.bias",
    ):
        assert header_key_map(config, {**shapes, extra: (1,)}, set()) is None, extra
    mixtral = _saved("mixtral", "hub", root)
    shapes_m = dict(Checkpoint.open(mixtral).shapes())
    config_m = load_config(str(mixtral))
    assert header_key_map(config_m, shapes_m, set()) is not None
    for dup in (
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.2.w1.weight",
    ):
        twin = {**shapes_m, dup.replace("block_sparse_moe", "mlp"): shapes_m[dup]}
        assert header_key_map(config_m, twin, set()) is None, dup
    qwen2 = _saved("qwen2_moe", "fused", root)
    shapes2 = dict(Checkpoint.open(qwen2).shapes())
    config2 = load_config(str(qwen2))
    assert header_key_map(config2, shapes2, set()) is not None
    for extra in ("model.layers.1.mlp.shared_expert.weight", "model.layers.1.self_attn.o_proj.bias"):
        assert header_key_map(config2, {**shapes2, extra: (1,)}, set()) is None, extra
    glm = _saved("glm4_moe", "fused", root)  # use_qk_norm and attention_bias are false
    shapes_g = dict(Checkpoint.open(glm).shapes())
    config_g = load_config(str(glm))
    assert header_key_map(config_g, shapes_g, set()) is not None
    for extra in ("model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_proj.bias"):
        assert header_key_map(config_g, {**shapes_g, extra: (1,)}, set()) is None, extra
    missing = {k: v for k, v in shapes.items() if k != "model.layers.1.mlp.experts.3.down_proj.weight"}
    assert header_key_map(config, missing, set()) is None
    wrong = {**shapes, "model.layers.1.mlp.gate.weight": (7, 64)}
    assert header_key_map(config, wrong, set()) is None
    # every expert the same, but not the intermediate size config.json gives: the model path names it
    narrow = {k: (v[0], v[1] - 1) if k.endswith("down_proj.weight") else v for k, v in shapes.items()}
    assert header_key_map(config, narrow, set()) is None


@pytest.mark.parametrize("ragged", [False, True])
def test_header_rewrite_imports_no_model_code(root, tmp_path, ragged):
    """The whole remove rewrite of a known family runs without transformers: no model code, and
    not even its config classes (config.json is read by arch/header_config.py); and without torch,
    since it copies byte ranges (torch alone would be ~230 MB of a rewrite's peak RSS). A ragged
    one too, its remote-code loader's spec included (header_serve_spec)."""
    src = _saved("deepseek_v3", "hub", root, json.dumps({"first_k_dense_replace": 0}))
    blocks = find_moe_blocks(build_on_meta(load_config(str(src))))
    kept = _ragged(blocks) if ragged else _kept(blocks)
    code = (
        "import json, sys\n"
        "from moeprune.surgery import rewrite_checkpoint\n"
        f"r = rewrite_checkpoint({str(src)!r}, {str(tmp_path / 'out')!r}, {kept!r})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch'))\n"
        "print(json.dumps([r.stock, r.remote_code_problem, bad]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [not ragged, None, []]
    assert (tmp_path / "out" / "config.json").is_file()
    assert (tmp_path / "out" / "modeling_moeprune.py").is_file() == ragged


@pytest.mark.parametrize("model_type, layout, overrides", [(t, lay, {}) for t, lay in CASES] + LAYER_CASES)
def test_header_plan_checks_equal_model_checks(model_type, layout, overrides, root):
    """`prune`'s plan checks on the config and blocks read from config.json and the headers
    (api._header_blocks: no model built) give what they give on the model built from
    transformers' config: the same fingerprint, top-k, and the same refusals."""
    from moeprune.api import _header_blocks, _model_top_k, check_plan_matches
    from moeprune.errors import UserError
    from moeprune.identity import fingerprint_fields

    path = _saved(model_type, layout, root, json.dumps(overrides))
    config = load_config(str(path))
    blocks = find_moe_blocks(build_on_meta(config))
    header = _header_blocks(path)
    assert header is not None, f"{model_type} {layout}: no header config or map"
    light, light_blocks = header
    assert type(light).__name__ == "HeaderConfig"
    assert fingerprint_fields(light, light_blocks) == fingerprint_fields(config, blocks)
    assert _model_top_k(light) == _model_top_k(config)
    kept = _kept(blocks)
    check_plan_matches(plan_for(config, blocks, kept), light, light_blocks)
    first, last = blocks[0].layer, blocks[-1].layer
    wrong = [
        {"model_fingerprint": "0" * 64},
        {"model_type": "mixtral" if model_type != "mixtral" else "olmoe"},
        {"num_experts": blocks[0].num_experts + 8, "model_fingerprint": ""},
        {"layers": sorted(kept)[1:], "kept": {k: v for k, v in kept.items() if k != first}, "model_fingerprint": ""},
        {"layers": [*sorted(kept), last + 50], "kept": {**kept, last + 50: kept[last]}, "model_fingerprint": ""},
    ]
    for over in wrong:
        plan = plan_for(config, blocks, kept, **over)
        errors = []
        for args in ((light, light_blocks), (config,)):
            with pytest.raises(UserError) as exc:
                check_plan_matches(plan, *args)
            errors.append(exc.value.line())
        assert errors[0] == errors[1], over


def test_cli_prune_imports_no_torch(root, tmp_path):
    """`moeprune prune MODEL --plan PLAN --out DIR` (remove mode, a family the headers tell, a
    bfloat16 checkpoint, a plan recording the router digest) runs in a fresh process without
    importing torch or transformers (nor numpy: the BF16 digest is a copy of bytes), and writes
    what the model-based path writes; --help, --version and prune --help import neither."""
    import torch

    from moeprune.identity import checkpoint_router_digest

    src = tmp_path / "bf16"
    tiny_model("qwen3_moe").to(torch.bfloat16).save_pretrained(src)
    config = load_config(str(src))
    blocks = find_moe_blocks(build_on_meta(config))
    digest = checkpoint_router_digest(src)
    assert digest
    plan = tmp_path / "plan.json"
    plan.write_text(plan_for(config, blocks, _kept(blocks), router_sha256=digest).dumps())

    for args in (("--help",), ("--version",), ("prune", "--help")):
        assert run_cli_fresh(*args) == (0, []), args
    assert run_cli_fresh("prune", str(src), "--plan", str(plan), "--out", str(tmp_path / "out")) == (0, [])
    # a plan of other router weights is still refused (the digest read from the stored bytes)
    other = tmp_path / "other.json"
    other.write_text(plan_for(config, blocks, _kept(blocks), router_sha256="f" * 64).dumps())
    assert run_cli_fresh("prune", str(src), "--plan", str(other), "--out", str(tmp_path / "out2"))[0] == 2
    assert not (tmp_path / "out2").exists()
    via_model = plan_rewrite(src, tmp_path / "x", _kept(blocks))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == via_model.new_config
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".moeprune-output",
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "plan.json",
    ]


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe", "gpt_oss"])
def test_dry_run_of_a_plain_removal_reads_the_headers_alone(root, tmp_path, model_type, monkeypatch):
    """`moeprune prune --dry-run` of a plain removal (a plan, or --keep) plans from config.json and
    the shard headers as the real run does: the same estimate as the model-based path (sizes,
    shards, counts), and a fresh process imports none of torch, transformers or numpy; a novice
    one too, with numpy only."""
    import moeprune.api as api
    from moeprune.api import estimate_prune

    src = _saved(model_type, "hub" if model_type in HUB_PER_EXPERT else "fused", root)
    config = load_config(str(src))
    blocks = find_moe_blocks(build_on_meta(config))
    plan = tmp_path / "plan.json"
    plan.write_text(plan_for(config, blocks, _kept(blocks)).dumps())
    same = ("shards", "bytes_read", "bytes_written", "source_tensor_bytes", "output_tensor_bytes", "kept", "top_k", "layers", "stock")
    for args in ({"plan": plan}, {"keep": 0.5}):
        light = estimate_prune(src, bandwidth="1GB/s", **args)
        with monkeypatch.context() as m:
            m.setattr(api, "_header_blocks", lambda src: None)
            full = estimate_prune(src, bandwidth="1GB/s", **args)
        assert [getattr(light, f) for f in same] == [getattr(full, f) for f in same], args
    code = (
        "import sys\nfrom moeprune.cli import main\n"
        f"rc = main(['prune', {str(src)!r}, '--plan', {str(plan)!r}, '--dry-run', '--json'])\n"
        "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'numpy'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []"
    # novice mode plans from the headers too (zeros stand in for the vectors): numpy, no torch
    light = estimate_prune(src, bandwidth="1GB/s", keep=0.5, mode="novice")
    with monkeypatch.context() as m:
        m.setattr(api, "_header_blocks", lambda src: None)
        full = estimate_prune(src, bandwidth="1GB/s", keep=0.5, mode="novice")
    assert [getattr(light, f) for f in same] == [getattr(full, f) for f in same]
    assert run_cli_fresh("prune", src, "--keep", "50%", "--mode", "novice", "--dry-run", "--json") == (0, ["numpy"])


def _ragged(blocks) -> dict[int, list[int]]:
    """:func:`_kept` with the first MoE layer keeping one fewer expert per routing group."""
    kept = _kept(blocks)
    first, groups = blocks[0], max(1, blocks[0].spec.n_group)
    size = first.num_experts // groups
    for g in range(groups):
        kept[first.layer].remove(max(e for e in kept[first.layer] if e // size == g))
    return kept


def _same_folders(a: Path, b: Path) -> None:
    """The same files with the same bytes."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("mode", ["remove", "novice"])
@pytest.mark.parametrize("model_type, layout", CASES)
def test_header_ragged_rewrite_equals_model_rewrite(model_type, layout, mode, root, tmp_path, monkeypatch):
    """A ragged removal (layers keeping different counts) or a novice checkpoint (novices in a
    buffer), each with moeprune's config and remote-code loader, planned from the headers writes
    what the model path writes: the loader's spec, which the header path derives without building
    the model (header_serve_spec), included."""
    import torch

    from moeprune.surgery import rewrite_checkpoint

    overrides = {"first_k_dense_replace": 0} if model_type in FIRST_DENSE else {}
    path = _saved(model_type, layout, root, json.dumps(overrides))
    config, blocks, _ = _model_map(path)
    kept = _ragged(blocks)
    novices = None
    if mode == "novice":
        g = torch.Generator().manual_seed(0)
        hidden = config.get_text_config().hidden_size
        novices = {
            b.layer: torch.randn(b.num_experts - len(kept[b.layer]), hidden, generator=g) for b in blocks
        }
    fast = rewrite_checkpoint(path, tmp_path / "fast", kept, mode=mode, novices=novices)
    with monkeypatch.context() as m:
        m.setattr(header_keys, "header_key_map", lambda *a, **k: None)
        slow = rewrite_checkpoint(path, tmp_path / "slow", kept, mode=mode, novices=novices)
    assert not fast.stock and fast.remote_code_problem is None and slow.remote_code_problem is None
    serve = json.loads((tmp_path / "fast" / "config.json").read_text())["moeprune"]["serve"]
    assert serve["tensors"] and serve["attributes"]  # the experts (remove: and routers) shrink
    assert bool(serve["novices"]) == (mode == "novice")
    _same_folders(tmp_path / "fast", tmp_path / "slow")


@pytest.mark.parametrize("model_type, layout", CASES)
def test_header_pad_uniform_novices_equal_model_ones(model_type, layout, root, tmp_path, monkeypatch):
    """`--mode novice --pad-uniform` (novices stored as zeroed experts with a down bias, a stock
    checkpoint) planned from the headers writes what the model path writes; a family whose experts
    have no biases is refused by both with the same line. The family table's answer is the one
    arch.pruned.bias_novice_problem gives on the built experts module."""
    import torch

    from moeprune.arch.pruned import bias_novice_problem
    from moeprune.errors import UserError
    from moeprune.surgery import rewrite_checkpoint

    overrides = {"first_k_dense_replace": 0} if model_type in FIRST_DENSE else {}
    path = _saved(model_type, layout, root, json.dumps(overrides))
    config, blocks, _ = _model_map(path)
    meta = build_on_meta(config)
    assert FAMILIES[model_type].bias_novice_problem == bias_novice_problem(blocks[0].experts(meta))
    kept = _ragged(blocks)
    g = torch.Generator().manual_seed(1)
    hidden = config.get_text_config().hidden_size
    novices = {b.layer: torch.randn(b.num_experts - len(kept[b.layer]), hidden, generator=g) for b in blocks}
    args = {"kept": kept, "mode": "novice", "novices": novices, "pad_uniform": True}
    try:
        fast = rewrite_checkpoint(path, tmp_path / "fast", **args)
    except UserError as exc:
        assert "--pad-uniform cannot store" in str(exc)
        with monkeypatch.context() as m, pytest.raises(UserError) as slow_exc:
            m.setattr(header_keys, "header_key_map", lambda *a, **k: None)
            rewrite_checkpoint(path, tmp_path / "slow", **args)
        assert str(slow_exc.value) == str(exc)
        assert not (tmp_path / "fast").exists() and not (tmp_path / "slow").exists()
        return
    with monkeypatch.context() as m:
        m.setattr(header_keys, "header_key_map", lambda *a, **k: None)
        slow = rewrite_checkpoint(path, tmp_path / "slow", **args)
    assert fast.stock and fast.padded and slow.stock
    assert plan_rewrite(path, tmp_path / "x", **args).from_headers
    _same_folders(tmp_path / "fast", tmp_path / "slow")
