"""The Python API (`moeprune.api`): the documented example runs, a loaded model works like its path,
the core never imports the command line, and one-shot outputs hold nothing a loader takes for
weights."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import moeprune.testing.tiny as tiny
from _cli import run_cli
from moeprune import api

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "moeprune"


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_core_never_imports_the_command_line():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or rel.name in ("cli.py", "__main__.py"):
            continue
        bad = sorted(n for n in _imports(path) if n.startswith(("moeprune.commands", "moeprune.cli")))
        if bad:
            offenders.append(f"{rel}: {', '.join(bad)}")
    assert not offenders, offenders


def test_import_stays_light():
    code = "import sys, moeprune, moeprune.api; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_docs_example_runs(index, tmp_path, monkeypatch, capsys):
    blocks = _python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[index], f"docs/api.md block {index}", "exec"), {})
    out = capsys.readouterr().out
    if index == 0:
        for name in ("dates.profile.safetensors", "dates-pruned/config.json", "dates-oneshot/moeprune/eval.json"):
            assert (tmp_path / name).is_file(), name
        assert out.startswith("easyep") and "accuracy" in out
    elif index == 1:
        assert (tmp_path / "dates-frequency" / "plan.json").is_file() and "accuracy" in out
    else:
        assert (tmp_path / "search" / "recipe.yaml").is_file() and out.splitlines()[-1].startswith("mone novice layer")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = tiny.tiny_model("qwen3_moe")
    m.save_pretrained(d)
    tiny.byte_tokenizer().save_pretrained(d)
    data = d / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 5}) + "\n" for i in range(6)))
    return d


def test_loaded_model_equals_path(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = [tiny_dir / "calib.jsonl"]
    by_path = api.profile(tiny_dir, data)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    loaded = api.profile(model, data)
    assert by_path.tensors.keys() == loaded.tensors.keys()
    for k, v in by_path.tensors.items():
        assert torch.equal(v, loaded.tensors[k]), k
    assert loaded.meta["model_fingerprint"] == by_path.meta["model_fingerprint"]

    assert api.inspect(model).to_json() == api.inspect(tiny_dir).to_json()
    plan = loaded.plan("frequency", keep=4)
    assert plan.to_json() == api.plan(by_path, "frequency", 4).to_json()
    result = api.prune(model, plan, tmp_path / "pruned")  # the checkpoint model.name_or_path names
    assert result.kept_counts and set(result.kept_counts.values()) == {4}
    task = [f"text={data[0]}"]
    a = api.evaluate(model, task, limit=3)["tasks"]["text"]["metrics"]
    b = api.evaluate(tiny_dir, task, limit=3)["tasks"]["text"]["metrics"]
    assert a == b


def test_loaded_model_without_a_folder_is_a_user_error():
    from moeprune.errors import UserError

    model = tiny.tiny_model("qwen3_moe")  # built in memory: no name_or_path
    with pytest.raises(UserError, match="name_or_path"):
        api.prune(model, "plan.json", "out")


def test_oneshot_top_folder_holds_only_the_model(tiny_dir, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "one"
    rc, _, err = run_cli(
        capsys, "prune", tiny_dir, "--data", tiny_dir / "calib.jsonl", "--method", "easyep", "--keep", "4",
        "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    assert (out / "moeprune" / "profile.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(out)  # stock transformers loads it
    # what vLLM's default loader reads: every *.safetensors of the top folder; only the model's
    # shards may be there, holding only checkpoint tensors
    files = {Path(f).name for f in glob.glob(os.path.join(out, "*.safetensors"))}
    index = out / "model.safetensors.index.json"
    shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    assert files == shards
    with safe_open(tiny_dir / "model.safetensors", framework="pt") as st:
        source = set(st.keys())
    for name in files:
        with safe_open(out / name, framework="pt") as st:
            assert set(st.keys()) <= source, name


def test_oneshot_prints_full_vs_pruned(tiny_dir, tmp_path, capsys):
    task = f"text={tiny_dir / 'calib.jsonl'}"
    out = tmp_path / "ev"
    args = ["--method", "frequency", "--keep", "4", "--eval", task, "--eval-limit", "2", "--out", out]
    rc, stdout, err = run_cli(capsys, "prune", tiny_dir, "--data", tiny_dir / "calib.jsonl", *args)
    assert rc == 0, err
    report = json.loads((out / "moeprune" / "eval.json").read_text())
    full = report["full"]["text"]["metrics"]["perplexity"]
    pruned = report["pruned"]["text"]["metrics"]["perplexity"]
    assert "full vs pruned" in stdout
    row = next(line for line in stdout.splitlines() if "perplexity" in line)
    assert f"{full:.4f}" in row and f"{pruned:.4f}" in row
    rc, stdout, err = run_cli(capsys, "run", out / "moeprune" / "recipe.yaml", "--force")
    assert rc == 0, err
    assert "full vs pruned" in stdout and f"{full:.4f}" in stdout


def test_recipe_eval_path_is_absolute(tiny_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "ppl.jsonl").write_text((tiny_dir / "calib.jsonl").read_text())
    monkeypatch.chdir(work)
    args = ["--method", "frequency", "--keep", "4", "--eval", "text=ppl.jsonl", "--eval-limit", "1"]
    rc, _, err = run_cli(capsys, "prune", tiny_dir, "--data", tiny_dir / "calib.jsonl", *args, "--out", "out")
    assert rc == 0, err
    recipe = work / "out" / "moeprune" / "recipe.yaml"
    assert yaml.safe_load(recipe.read_text())["eval"] == [f"text={work / 'ppl.jsonl'}"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, _, err = run_cli(capsys, "run", recipe, "--force", "-q")
    assert rc == 0, err


def test_compare_report_library_take_a_loaded_model(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tiny_dir / "calib.jsonl"
    prof_path = tmp_path / "calib.profile.safetensors"
    api.profile(tiny_dir, [data], out=prof_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    task = [f"text={data}"]
    kw = {"methods": ["frequency"], "keeps": [4], "novice": False, "limit": 2}
    rows, report = api.compare(model, [prof_path], task, out=tmp_path / "cmp", **kw)
    rows_path, _ = api.compare(tiny_dir, [prof_path], task, **kw)
    assert [r["tasks"] for r in rows] == [r["tasks"] for r in rows_path]
    assert report["profiles"] == [{"name": "calib", "path": str(prof_path)}]
    assert (tmp_path / "cmp" / "results.json").is_file()

    rep = api.report([prof_path], tmp_path / "rep")
    assert (tmp_path / "rep" / "index.html").is_file() and rep

    lib = api.build_library(model, {"a": data, "b": prof_path}, 4, tmp_path / "lib")
    assert lib.names == ["a", "b"]
    lib, routes = api.route(tmp_path / "lib", ["sample 1 sample 1"], model=model)
    assert len(routes) == 1 and routes[0].match.task in ("a", "b")


def test_oneshot_with_a_loaded_model_equals_the_path(tiny_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = [tiny_dir / "calib.jsonl"]
    task = [f"text={data[0]}"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    a = api.oneshot(model, data, "easyep", 4, tmp_path / "a", eval=task, eval_limit=2)
    b = api.oneshot(tiny_dir, data, "easyep", 4, tmp_path / "b", eval=task, eval_limit=2)
    assert a.plan.kept == b.plan.kept and a.eval["pruned"] == b.eval["pruned"]
    assert a.eval["full"] == b.eval["full"]
    wa, wb = (load_file(r.out / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
