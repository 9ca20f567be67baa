"""`moeprune compare`: masked rows equal evaluating the checkpoint `moeprune prune` writes, the full
row equals `evaluate()` on the unmodified model, files and plots are written, user errors write nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moeprune.testing.tiny as tiny  # noqa: E402
from moeprune.cli import main
from moeprune.testing.tiny import byte_tokenizer


def _save(model, d: Path) -> Path:
    model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id = 2, 0, 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # deepseek_v3: 8 experts, top-2, 2 groups of which a token may use 1 (keep 0.25 is group-invalid)
    return _save(tiny.tiny_model("deepseek_v3"), tmp_path_factory.mktemp("tiny-dsv3"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    words = ["alpha", "beta", "x = 1", "print(2)", "gamma ray", "def f():", "42"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, 7, (n,), generator=g)) for n in (3, 12, 6, 9)]
    (d / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (d / "calib2.jsonl").write_text(
        "".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(4))
    )
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": t[::-1] + " " + t}) + "\n" for t in lines))
    (d / "em.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i} + {3 * i} = ", "answer": str(4 * i)}) + "\n" for i in range(3))
    )
    return d


def _run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def profile(model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "code.profile.safetensors"
    assert _run("profile", model_dir, "--data", data / "calib.jsonl", "--out", out, "-q") == 0
    return out


def _tasks(data: Path) -> list[str]:
    return [f"ppl={data / 'ppl.jsonl'}", f"em={data / 'em.jsonl'}"]


def _eval(path: Path, data: Path) -> dict:
    from moeprune.evaluate import evaluate, load_model_and_tokenizer

    lm, tok = load_model_and_tokenizer(str(path), device="cpu")
    return evaluate(lm, tok, _tasks(data), batch_size=2, max_new_tokens=4, progress=False)["tasks"]


def test_cli_compare_matches_pruned_checkpoints(model_dir, data, profile, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", model_dir, "--profile", profile, "--batch-size", "2", "--max-new-tokens", "4"]
    for t in _tasks(data):
        args += ["--task", t]
    args += [
        "--method",
        "easyep",
        "--method",
        "frequency",
        "--keep",
        "0.75",
        "--keep",
        "0.5",
        "--keep",
        "0.25",
    ]
    assert _run(*args, "--out", out) == 0
    printed = capsys.readouterr()
    assert "moeprune compare" in printed.out and "skipped" in printed.out

    names = sorted(p.name for p in out.iterdir())
    assert names == [".moeprune-output", "plot_em.png", "plot_ppl.png", "results.csv", "results.json", "results.md"]
    for png in ("plot_em.png", "plot_ppl.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    report = json.loads((out / "results.json").read_text())
    rows = report["rows"]
    # full + 2 keeps x 2 methods x (mask, novice) + one skipped row for keep 0.25
    assert [(r["method"], r["mode"]) for r in rows][0] == ("full", "full")
    assert len(rows) == 1 + 2 * 2 * 2 + 1
    skipped = [r for r in rows if r["skipped"]]
    assert len(skipped) == 1 and skipped[0]["keep"] == 0.25
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and "skipped" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1 and "ppl.perplexity" in csv_lines[0]

    # the full row is evaluate() on the unmodified model
    full = _eval(model_dir, data)
    assert rows[0]["tasks"]["ppl"]["perplexity"] == pytest.approx(
        full["ppl"]["metrics"]["perplexity"], rel=1e-6
    )
    assert rows[0]["tasks"]["em"]["accuracy"] == full["em"]["metrics"]["accuracy"]

    # the masked row equals the checkpoint `moeprune prune` writes; the novice row its novice checkpoint
    plan = tmp_path / "plan.json"
    assert _run("plan", profile, "--method", "easyep", "--keep", "0.5", "--out", plan) == 0
    kept = json.loads(plan.read_text())["kept"]
    for mode in ("remove", "novice"):
        ckpt = tmp_path / f"pruned-{mode}"
        assert (
            _run("prune", model_dir, "--plan", plan, "--mode", mode, "--profile", profile, "--out", ckpt) == 0
        )
        ref = _eval(ckpt, data)
        row = next(
            r
            for r in rows
            if r["method"] == "easyep"
            and r["keep"] == 0.5
            and r["mode"] == ("mask" if mode == "remove" else mode)
        )
        assert row["kept"] == kept and row["experts"] == 4 and row["kept_fraction"] == 0.5
        got, want = row["tasks"]["ppl"]["perplexity"], ref["ppl"]["metrics"]["perplexity"]
        assert math.isclose(got, want, rel_tol=1e-4), (mode, got, want)
        assert row["tasks"]["em"]["accuracy"] == ref["em"]["metrics"]["accuracy"]
        # pruning changes the model: the row is not the full model's
        assert not math.isclose(got, rows[0]["tasks"]["ppl"]["perplexity"], rel_tol=1e-6)


def test_api_several_profiles_and_mixed_domain(model_dir, data, profile, tmp_path):
    from moeprune.compare import compare, write_results
    from moeprune.evaluate import load_model_and_tokenizer
    from moeprune.profile import Profile

    other = tmp_path / "math.profile.safetensors"
    assert _run("profile", model_dir, "--data", data / "calib2.jsonl", "--out", other, "-q") == 0
    lm, tok = load_model_and_tokenizer(str(model_dir), device="cpu")
    profiles = [Profile.load(profile), Profile.load(other)]
    rows = compare(
        lm,
        tok,
        profiles,
        [f"ppl={data / 'ppl.jsonl'}"],
        ["random", "gate"],
        [0.5],
        novice=False,
        profile_names=["code", "math"],
        batch_size=4,
    )
    assert [(r["domain"], r["method"], r["mode"]) for r in rows] == [
        ("-", "full", "full"),
        ("code", "random", "mask"),
        ("code", "gate", "mask"),
        ("math", "random", "mask"),
        ("math", "gate", "mask"),
        ("mixed", "random", "mask"),
        ("mixed", "gate", "mask"),
    ]
    for r in rows[1:]:
        assert all(len(ids) == 4 for ids in r["kept"].values())
    files = write_results(tmp_path, rows, {"model": "tiny", "tasks": {"ppl": "perplexity"}, "num_experts": 8})
    assert (tmp_path / "plot_ppl.png").is_file() and files[-1] == "plot_ppl.png"


def test_cli_lsq_novice_rows_match_the_lsq_checkpoint(model_dir, data, profile, tmp_path):
    """`compare --novice-fit lsq`'s novice row is the checkpoint `prune --novice lsq` writes, and
    differs from the mean novices' row."""
    rows = {}
    for fit in ("mean", "lsq"):
        out = tmp_path / f"cmp-{fit}"
        args = ["compare", model_dir, "--profile", profile, "--batch-size", "2", "--max-new-tokens", "4"]
        args += ["--task", _tasks(data)[0], "--method", "easyep", "--keep", "0.5", "--novice-fit", fit]
        assert _run(*args, "--out", out) == 0
        report = json.loads((out / "results.json").read_text())
        assert report["settings"]["novice_fit"] == fit
        rows[fit] = next(r for r in report["rows"] if r["mode"] == "novice")
    plan = tmp_path / "plan.json"
    assert _run("plan", profile, "--method", "easyep", "--keep", "0.5", "--out", plan) == 0
    ckpt = tmp_path / "lsq"
    args = ["prune", model_dir, "--plan", plan, "--mode", "novice", "--novice", "lsq", "--profile", profile]
    assert _run(*args, "--out", ckpt) == 0
    want = _eval(ckpt, data)["ppl"]["metrics"]["perplexity"]
    got = rows["lsq"]["tasks"]["ppl"]["perplexity"]
    assert math.isclose(got, want, rel_tol=1e-4), (got, want)
    assert not math.isclose(got, rows["mean"]["tasks"]["ppl"]["perplexity"], rel_tol=1e-6)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--keep", "1.5"], "outside (0, 1]"),
        (["--keep", "0"], "cannot keep 0 experts"),
        (["--keep", "9"], "the model has 8"),
        (["--keep", "abc"], "not a number"),
        (["--task", "missing.jsonl"], "missing.jsonl"),
        (["--novice-fit", "median"], "unknown --novice-fit 'median'"),
    ],
)
def test_cli_user_errors_write_nothing(model_dir, data, profile, tmp_path, capsys, extra, needle):
    out = tmp_path / "cmp"
    code = _run("compare", model_dir, "--profile", profile, "--task", _tasks(data)[0], *extra, "--out", out)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_profile_of_another_model(data, profile, tmp_path, capsys):
    other = _save(tiny.tiny_model("qwen3_moe"), tmp_path / "qwen")
    out = tmp_path / "cmp"
    assert _run("compare", other, "--profile", profile, "--task", _tasks(data)[0], "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "profile" in err and "not model" in err, err
    assert not out.exists()
    existing = tmp_path / "full"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert _run("compare", other, "--profile", profile, "--task", _tasks(data)[0], "--out", existing) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_cli_interrupted_compare_keeps_finished_rows_and_resumes(
    model_dir, data, profile, tmp_path, capsys, monkeypatch
):
    import moeprune.evaluate.runners as runners

    real = runners.evaluate
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        if interrupt_at and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runners, "evaluate", counting)
    out = tmp_path / "cmp"
    args = ["compare", model_dir, "--profile", profile, "--task", _tasks(data)[0], "--method", "random",
            "--method", "gate", "--keep", "0.5", "--no-novice", "--batch-size", "2", "--out", out]  # fmt: skip
    interrupt_at = 3  # full, random done; Ctrl-C during gate
    assert _run(*args) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    partial = tmp_path / "cmp.partial.jsonl"
    assert last.startswith("moeprune: error: interrupted; 2 finished rows") and str(partial) in last
    assert not out.exists() and len(partial.read_text().splitlines()) == 3  # header + 2 rows
    finished = [json.loads(line) for line in partial.read_text().splitlines()[1:]]

    calls.clear()
    interrupt_at = 0
    assert _run(*args) == 0
    err = capsys.readouterr().err
    assert len(calls) == 1 and "resuming: 2 finished rows" in err and err.count(": resumed") == 2
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "random", "gate"] and rows[:2] == finished
    assert not partial.exists()

    # a run with other settings does not take rows of another: a partial file of --limit 1 is replaced
    calls.clear()
    interrupt_at = 2
    assert _run(*args[:-2], "--limit", "1", "--out", tmp_path / "cmp2") == 130
    capsys.readouterr()
    (tmp_path / "cmp2.partial.jsonl").rename(partial)
    calls.clear()
    interrupt_at = 0
    assert _run(*args, "--force") == 0
    assert len(calls) == 3 and "other data or settings" in capsys.readouterr().err


def test_plot_legend_covers_no_curve_and_long_notes_wrap(model_dir, data, profile, tmp_path, capsys):
    from moeprune.compare import plot_figure

    rows = [
        {"domain": "-", "method": "full", "mode": "full", "kept_fraction": 1.0, "tasks": {"t": {"perplexity": 9.0}}},
    ]
    for method in ("easyep", "frequency", "random", "gate", "premoe"):
        for mode in ("mask", "novice"):
            for i, frac in enumerate((0.25, 0.5, 0.75)):
                rows.append({"domain": "d", "method": method, "mode": mode, "kept_fraction": frac,
                             "skipped": None, "tasks": {"t": {"perplexity": 10.0 + i + len(method)}}})  # fmt: skip
    fig = plot_figure("t", "perplexity", rows[0], rows[1:], ["d"], ["easyep", "frequency", "random", "gate", "premoe"])
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert ax.get_legend() is None and not legend.overlaps(ax.get_window_extent())

    # a long note (a skip reason) wraps in its column of the terminal table
    from moeprune.commands.compare import NOTE_WIDTH, _print_table

    long = {"domain": "d", "method": "*", "keep": 0.125, "experts": None, "kept_fraction": 0.125,
            "mode": "-", "skipped": "a very long reason " * 30, "tasks": {}}  # fmt: skip
    _print_table([rows[0] | {"keep": 1.0, "experts": 8, "skipped": None}, long],
                 {"model": "m", "tasks": {"t": "perplexity"}, "num_experts": 8})  # fmt: skip
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) < 60 + NOTE_WIDTH
