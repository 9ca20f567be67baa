"""Ragged and novice checkpoints in plain transformers, without moeprune (``moeprune.remote``).

Each checkpoint is loaded in a subprocess where ``import moeprune`` is impossible (a meta-path
blocker: moeprune is installed editable, so a fresh venv would still see it) with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` and ``pipeline()``; its
float32 logits and greedy text must equal what ``moeprune.load`` gives, and loading it without
``trust_remote_code`` (also with ``ignore_mismatched_sizes=True``) must raise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeprune
from moeprune.arch import find_moe_blocks
from moeprune.modelio import load_tokenizer
from moeprune.surgery import rewrite_checkpoint
from moeprune.testbed import MODEL_DIR as TESTBED
from moeprune.testing.tiny import tiny_model

PROMPT = "The cat"
NEW_TOKENS = 12

# Runs in the subprocess: argv[1] is a JSON list of checkpoint folders, argv[2] the output folder.
CHILD = r"""
import json, sys
from pathlib import Path

class NoMoeprune:
    def find_spec(self, name, path=None, target=None):
        if name == "moeprune" or name.startswith("moeprune."):
            raise ImportError("moeprune is blocked in this test")

sys.meta_path.insert(0, NoMoeprune())
try:
    import moeprune  # noqa: F401
    raise SystemExit("the blocker let moeprune through")
except ImportError:
    pass

import torch
from transformers import AutoModelForCausalLM, pipeline

torch.set_num_threads(1)
out = Path(sys.argv[2])
report = {}
for i, path in enumerate(json.loads(sys.argv[1])):
    r = report[path] = {}
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    r["class"] = type(model).__name__
    ids = torch.arange(3, 40).reshape(1, -1) % model.config.vocab_size
    with torch.no_grad():
        torch.save(model(ids).logits, out / f"{i}.pt")
    r["refused"] = []
    for kwargs in ({}, {"ignore_mismatched_sizes": True}):
        try:
            AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except Exception as exc:
            r["refused"].append(f"{type(exc).__name__}: {exc}"[:400])
    pipe = pipeline("text-generation", model=path, trust_remote_code=True, dtype=torch.float32)
    r["text"] = pipe(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
(out / "report.json").write_text(json.dumps(report))
""".replace("PROMPT", repr(PROMPT)).replace("NEW_TOKENS", str(NEW_TOKENS))


def _novices(kept: dict[int, list[int]], experts: int, hidden: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {
        layer: torch.randn(experts - len(ids), hidden, generator=gen) * 0.3 for layer, ids in kept.items()
    }


def _testbed_kept() -> dict[int, list[int]]:
    # 32 experts in 4 routing groups of 8: keep 4, 6 and 2 per group (a count per layer)
    return {layer: [g * 8 + i for g in range(4) for i in range(n)] for layer, n in ((1, 4), (2, 6), (3, 2))}


def _tiny_source(model_type: str, folder: Path) -> tuple[Path, dict[int, list[int]], int, int]:
    """A tiny random model with the testbed's vocabulary (so the testbed tokenizer drives the
    pipeline), saved one key per expert where the hub does so, and a ragged choice of experts."""
    layers = {} if model_type == "gpt_oss" else {"num_hidden_layers": 3}  # gpt-oss: 2 layer types
    model = tiny_model(model_type, vocab_size=2048, **layers)
    blocks = find_moe_blocks(model)
    experts = blocks[0].num_experts
    counts = (experts - 2, experts // 2, experts - 1)
    kept = {b.layer: sorted(range(experts))[: counts[j % 3]] for j, b in enumerate(blocks)}
    model.save_pretrained(folder, save_original_format=model_type in ("mixtral", "qwen3_moe"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((TESTBED / name).read_bytes())
    return folder, kept, experts, int(model.config.hidden_size)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote")
    out: dict[str, Path] = {}
    kept = _testbed_kept()
    out["testbed-ragged"] = rewrite_checkpoint(TESTBED, root / "testbed-ragged", kept).out_dir
    novices = _novices(kept, 32, 128)
    out["testbed-novice"] = rewrite_checkpoint(
        TESTBED, root / "testbed-novice", kept, mode="novice", novices=novices
    ).out_dir
    for model_type, modes in (
        ("mixtral", ("remove", "novice")),
        ("qwen3_moe", ("novice",)),
        ("gpt_oss", ("novice",)),
    ):
        src, kept, experts, hidden = _tiny_source(model_type, root / f"{model_type}-src")
        for mode in modes:
            novices = _novices(kept, experts, hidden) if mode == "novice" else None
            name = f"{model_type}-{'ragged' if mode == 'remove' else mode}"
            result = rewrite_checkpoint(src, root / name, kept, mode=mode, novices=novices)
            assert not result.stock and result.remote_code_problem is None, (name, result.remote_code_problem)
            out[name] = result.out_dir
    return out


@pytest.fixture(scope="module")
def child_report(checkpoints, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("child")
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(out / "modules"),  # transformers copies the remote code here
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
    }
    paths = [str(p) for p in checkpoints.values()]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(paths), str(out)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,  # transformers asks on a terminal whether to run remote code
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), out


def _greedy_text(path: Path) -> str:
    """The same pipeline, given the model ``moeprune.load`` builds."""
    from transformers import pipeline

    model = moeprune.load(path, dtype=torch.float32).eval()
    pipe = pipeline("text-generation", model=model, tokenizer=load_tokenizer(path))
    return pipe(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]


def test_config_marks_the_checkpoint(checkpoints):
    for name, path in checkpoints.items():
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"].startswith("moeprune_"), name
        assert config["architectures"] == ["MoepruneForCausalLM"]
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moeprune.MoepruneForCausalLM"
        assert (path / "modeling_moeprune.py").is_file()
        card = (path / "README.md").read_text()
        assert "trust_remote_code=True" in card


def test_plain_transformers_equals_moeprune_load(checkpoints, child_report):
    report, out = child_report
    torch.set_num_threads(1)
    for i, (name, path) in enumerate(checkpoints.items()):
        r = report[str(path)]
        assert r["class"] == "MoepruneForCausalLM", name
        mine = moeprune.load(path, dtype=torch.float32).eval()
        ids = torch.arange(3, 40).reshape(1, -1) % mine.config.vocab_size
        with torch.no_grad():
            want = mine(ids).logits
        got = torch.load(out / f"{i}.pt")
        assert torch.equal(got, want), (name, (got - want).abs().max().item())
        assert r["text"] == _greedy_text(path), name


def test_without_trust_remote_code_loading_fails(child_report):
    report, _ = child_report
    for path, r in report.items():
        # plain, and with ignore_mismatched_sizes: transformers asks for trust_remote_code
        assert len(r["refused"]) == 2, (path, r["refused"])
        assert all("custom code" in why for why in r["refused"]), r["refused"]


def test_novice_differs_from_ragged(checkpoints, child_report):
    """The two kinds of the testbed are different models (the check above could not pass by
    comparing a checkpoint with itself under another name)."""
    _, out = child_report
    names = list(checkpoints)
    a = torch.load(out / f"{names.index('testbed-ragged')}.pt")
    b = torch.load(out / f"{names.index('testbed-novice')}.pt")
    assert not torch.allclose(a, b)


def test_dbrx_novices_get_no_loader_and_stay_refused(tmp_path):
    """DBRX stores experts as 2D row blocks, which the template does not compute: no loader is
    written, the card says why, and the checkpoint is still refused by stock transformers (its
    model type is moeprune's) while moeprune.load reads it."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("dbrx")
    model.save_pretrained(tmp_path / "src")
    blocks = find_moe_blocks(model)
    e = blocks[0].num_experts
    kept = {b.layer: list(range(e // 2)) for b in blocks}
    novices = _novices(kept, e, int(model.config.d_model))
    result = rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
    assert result.remote_code_problem is not None and "DBRX" in result.remote_code_problem
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "moeprune_dbrx" and "auto_map" not in config
    assert not (tmp_path / "out" / "modeling_moeprune.py").exists()
    assert result.remote_code_problem in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(ValueError, match="moeprune_dbrx"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert moeprune.load(tmp_path / "out", dtype=torch.float32) is not None
