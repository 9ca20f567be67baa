"""One-shot pruning (`moeprune prune MODEL --data ...`) and recipes (`moeprune run recipe.yaml`):
the same result as profile -> plan -> prune, evaluation in the model card, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import moeprune.testing.tiny as tiny  # noqa: E402
from moeprune.cli import main
from moeprune.recipe import load_recipe
from moeprune.testing.tiny import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-dsv3")
    m = tiny.tiny_model("deepseek_v3")
    m.config.eos_token_id, m.config.pad_token_id, m.config.bos_token_id = 2, 0, 1
    m.generation_config.eos_token_id = 2
    m.generation_config.pad_token_id = 0
    m.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "demos.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"prompt": f"{i} + {3 * i} = ", "response": str(4 * i)}) + "\n")
    with open(d / "ppl.jsonl", "w") as f:
        for text in ("alpha beta gamma", "x = 1; print(x)", "the cat sat"):
            f.write(json.dumps({"text": text}) + "\n")
    return d / "demos.jsonl"


def _run(*args) -> int:
    return main([str(a) for a in args])


def _kept(path: Path) -> dict:
    return json.loads(path.read_text())["kept"]


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_model(a: Path, b: Path) -> None:
    assert _kept(a / "plan.json") == _kept(b / "plan.json")
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_oneshot_equals_three_steps(model_dir, data_file, tmp_path):
    steps = tmp_path / "steps"
    steps.mkdir()
    prof, plan = steps / "p.profile.safetensors", steps / "plan.json"
    assert _run("profile", model_dir, "--data", data_file, "--out", prof, "-q") == 0
    assert _run("plan", prof, "--method", "easyep", "--keep", "0.5", "--out", plan) == 0
    assert _run("prune", model_dir, "--plan", plan, "--profile", prof, "--out", steps / "pruned") == 0

    one = tmp_path / "one"
    assert (
        _run("prune", model_dir, "--data", data_file, "--method", "easyep", "--keep", "0.5", "--out", one)
        == 0
    )
    _same_model(steps / "pruned", one)
    for name in ("moeprune/profile.safetensors", "plan.json", "moeprune/recipe.yaml", "README.md", "config.json"):
        assert (one / name).is_file(), name
    assert not (one / "moeprune" / "eval.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "steps"]  # no temporary folder left
    recipe = yaml.safe_load((one / "moeprune" / "recipe.yaml").read_text())
    assert recipe["method"] == "easyep" and recipe["keep"] == "0.5"
    assert recipe["data"] == [str(data_file.resolve())] and recipe["out"] == str(one.resolve())


def test_oneshot_eval_writes_table(model_dir, data_file, tmp_path):
    out = tmp_path / "ev"
    ppl = data_file.parent / "ppl.jsonl"
    args = ["--method", "frequency", "--keep", "4", "--mode", "novice", "--eval", f"text={ppl}"]
    assert _run("prune", model_dir, "--data", data_file, *args, "--eval-limit", "2", "--out", out) == 0
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "| task | metric | full | pruned |" in card
    assert "| text | perplexity |" in card
    report = json.loads((out / "moeprune" / "eval.json").read_text())
    assert report["full"]["text"]["n"] == 2 and "perplexity" in report["pruned"]["text"]["metrics"]
    assert report["limit"] == 2


def test_recipe_equals_cli(model_dir, data_file, tmp_path):
    rdir = tmp_path / "rec"
    rdir.mkdir()
    (rdir / "demos.jsonl").write_text(data_file.read_text())
    settings = {"method": "easyep", "keep": 0.5, "self_generate": 3, "scope": "global", "seed": 1}
    recipe = {"model": str(model_dir), "data": ["demos.jsonl"], "out": "out", **settings}
    (rdir / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert _run("run", rdir / "r.yaml", "-q") == 0
    cli = tmp_path / "cli"
    flags = [
        "--method",
        "easyep",
        "--keep",
        "0.5",
        "--self-generate",
        "3",
        "--scope",
        "global",
        "--seed",
        "1",
    ]
    assert _run("prune", model_dir, "--data", rdir / "demos.jsonl", *flags, "--out", cli) == 0
    _same_model(rdir / "out", cli)
    demos = [(d / "moeprune" / "demos.jsonl").read_text() for d in (rdir / "out", cli)]
    assert demos[0] == demos[1]
    a, b = (yaml.safe_load((d / "moeprune" / "recipe.yaml").read_text()) for d in (rdir / "out", cli))
    assert a.pop("out") == str((rdir / "out").resolve()) and b.pop("out") == str(cli.resolve())
    assert a == b
    # the saved recipe makes the run again
    assert _run("run", cli / "moeprune" / "recipe.yaml", "--force", "-q") == 0
    _same_model(rdir / "out", cli)


BAD = {
    "both": lambda m, d, r: ["prune", m, "--plan", d, "--data", d, "--method", "easyep", "--keep", "2"],
    "neither": lambda m, d, r: ["prune", m],
    "no-method": lambda m, d, r: ["prune", m, "--data", d, "--keep", "2"],
    "oneshot-flag-with-plan": lambda m, d, r: ["prune", m, "--plan", d, "--keep", "2"],
    "bad-method": lambda m, d, r: ["prune", m, "--data", d, "--method", "nope", "--keep", "2"],
    "missing-recipe": lambda m, d, r: ["run", r / "none.yaml"],
    "unknown-key": lambda m, d, r: [
        "run",
        _recipe(r, model=str(m), data=[str(d)], method="easyep", keep=2, kep=1),
    ],
    "missing-key": lambda m, d, r: ["run", _recipe(r, model=str(m), data=[str(d)], method="easyep")],
    "not-a-mapping": lambda m, d, r: ["run", _write(r / "list.yaml", "- a\n- b\n")],
    "bad-yaml": lambda m, d, r: ["run", _write(r / "bad.yaml", "model: [\n")],
    "bad-type": lambda m, d, r: [
        "run",
        _recipe(r, model=str(m), data=[str(d)], method="easyep", keep=2, seed="x"),
    ],
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _recipe(r: Path, **values) -> Path:
    values.setdefault("out", "out")
    return _write(r / "recipe.yaml", yaml.safe_dump(values))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_nothing_written(case, model_dir, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = BAD[case](model_dir, data_file, tmp_path)
    if "--out" not in args and args[0] == "prune":
        args += ["--out", tmp_path / "out"]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeprune: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "unknown-key":
        assert "kep" in err[0]
    if case == "missing-key":
        assert "keep" in err[0] and "out" not in err[0].split("lacks")[1].split(";")[0]


def test_failure_in_profile_leaves_nothing(model_dir, tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", '{"nothing": 1}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["--data", bad, "--method", "easyep", "--keep", "2", "--out", tmp_path / "out"]
    assert _run("prune", model_dir, *args) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_example_recipe_parses():
    s = load_recipe(ROOT / "examples" / "recipe.yaml")
    assert Path(s.model).resolve() == (ROOT / "src/moeprune/testbed/model").resolve()
    assert (Path(s.model) / "config.json").is_file()
    assert all(Path(d).is_file() for d in s.data)
    assert Path(s.out).resolve().parent == (ROOT / "runs").resolve()
    assert s.method == "easyep" and s.keep == "0.5" and s.eval
    from moeprune.oneshot import check_settings

    if (ROOT / "runs").is_dir():  # out's parent must exist for the full checks
        check_settings(s)


def test_method_defaults_to_mone(model_dir, data_file, tmp_path):
    """One-shot and recipes without a method use moeprune's measured default (docs/methods.md)."""
    from moeprune.score import DEFAULT_METHOD

    assert DEFAULT_METHOD == "mone"
    assert _run("prune", model_dir, "--data", data_file, "--keep", "0.5", "--out", tmp_path / "o") == 0
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["method"] == "mone"
    recipe = _recipe(tmp_path, model=str(model_dir), data=[str(data_file)], keep=2)
    assert load_recipe(recipe).method == "mone"
