"""Pattern libraries on the testbed: building (from data or profiles), routing queries, and the
`library`, `generate` and `chat` commands, with their bad-input errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from _cli import assert_user_error, run_cli
from moeprune.cli import main
from moeprune.errors import UserError
from moeprune.library import Library, build_library
from moeprune.profile import Profile
from moeprune.testbed import MODEL_DIR, data_file

DATES, REVERSE = "dates", "reverse"
KEEP = 16


@pytest.fixture(scope="module")
def profiles(tmp_path_factory) -> dict[str, Path]:
    from moeprune.profiling import run_profile

    out = {}
    folder = tmp_path_factory.mktemp("profiles")
    for task in (DATES, REVERSE):
        out[task] = folder / f"{task}.profile.safetensors"
        run_profile(
            model=str(MODEL_DIR),
            data=[str(data_file(task, "calib"))],
            out=out[task],
            max_samples=12,
            quiet=True,
        )
    return out


@pytest.fixture(scope="module")
def library(tmp_path_factory, profiles) -> Path:
    """Built by the CLI: one task from data, one from its profile."""
    out = tmp_path_factory.mktemp("lib") / "lib"
    rc = main(
        [
            "library", "build", str(MODEL_DIR),
            "--task", f"{DATES}={data_file(DATES, 'calib')}",
            "--task", f"{REVERSE}={profiles[REVERSE]}",
            "--keep", str(KEEP), "--out", str(out), "--max-samples", "12", "-q",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


def test_library_from_profiles_holds_plans_and_premoe_keys(profiles, tmp_path):
    from moeprune.plan import make_plan
    from moeprune.score import break_ties, score_easyep, score_premoe

    loaded = {t: Profile.load(p) for t, p in profiles.items()}
    lib = build_library(loaded, model=str(MODEL_DIR), method="premoe", keep=KEEP)
    for task, prof in loaded.items():
        peu = score_premoe(prof)
        pattern = lib.task(task)
        assert torch.equal(pattern.keys["first"], peu[0]) and torch.equal(
            pattern.keys["all"], peu.reshape(-1)
        )
        routing = prof.meta["routing"]
        ref = make_plan(
            break_ties(peu, score_easyep(prof)), keep=KEEP, top_k=prof.top_k, n_group=routing["n_group"], topk_group=routing["topk_group"],
            group_score=routing["group_score"], layers=prof.layers,
        )  # fmt: skip
        assert pattern.plan.kept == ref.kept
        assert all(len(ids) == KEEP for ids in pattern.plan.kept.values())
    lib.save(tmp_path / "lib")
    back = Library.load(tmp_path / "lib")
    assert back.names == lib.names and back.keep == KEEP and back.model_fingerprint == lib.model_fingerprint
    for task in lib.names:
        assert back.task(task).plan.kept == lib.task(task).plan.kept
        assert torch.equal(back.task(task).keys["all"], lib.task(task).keys["all"])
    assert 0.0 <= lib.overlap(DATES, REVERSE) < 1.0 and lib.overlap(DATES, DATES) == 1.0
    # the plan files are ordinary plans: `moeprune prune --plan` takes them
    assert (tmp_path / "lib" / "plans" / f"{DATES}.plan.json").is_file()


def test_cli_build_and_show(library, profiles, capsys):
    index = json.loads((library / "library.json").read_text())
    assert [t["name"] for t in index["tasks"]] == [DATES, REVERSE]
    # the default method is the measured best (mone); the keys stay PreMoe's statistic
    assert index["keep"] == KEEP and index["key_statistic"] == "premoe" and index["method"] == "mone"
    assert index["tasks"][0]["source"] == "data" and index["tasks"][1]["source"] == "profile"
    assert not any(p.suffix == ".safetensors" and p.stat().st_size > 100_000 for p in library.rglob("*"))
    lib = Library.load(library)
    same = build_library(
        {REVERSE: Profile.load(profiles[REVERSE])}, model=str(MODEL_DIR), method="mone", keep=KEEP
    )
    assert lib.task(REVERSE).plan.kept == same.task(REVERSE).plan.kept
    rc, _, err = run_cli(capsys, "library", "show", library)
    assert rc == 0 and DATES in err and "shared with" in err


def test_cli_route_single_query_and_file(library, tmp_path, capsys):
    prompt = json.loads(data_file(DATES, "eval").read_text().splitlines()[0])["prompt"]
    rc, out, err = run_cli(capsys, "library", "route", library, prompt)
    assert rc == 0, err
    assert f"-> {DATES}" in out and "nearest task" in out
    queries = tmp_path / "q.jsonl"
    rows = []
    for task in (DATES, REVERSE):
        for line in data_file(task, "eval").read_text().splitlines()[:6]:
            rows.append({"prompt": json.loads(line)["prompt"], "task": task})
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tmp_path / "routes.json"
    rc, out, err = run_cli(capsys, "library", "route", library, "--file", queries, "-o", result)
    assert rc == 0, err
    data = json.loads(result.read_text())
    assert len(data["results"]) == 12
    correct = sum(r["task"] == r["label"] for r in data["results"])
    assert data["accuracy"] == correct / 12 and "routing accuracy" in out
    first = data["results"][0]
    assert set(first["distances"]) == {DATES, REVERSE} and 0.0 <= first["mean_coverage"] <= 1.0
    assert first["task"] == min(first["distances"], key=first["distances"].get)
    rc, out, err = run_cli(
        capsys, "library", "route", library, "--file", queries, "--key", "all", "-o", result, "--force"
    )
    assert rc == 0, err
    assert len(json.loads(result.read_text())["results"][0]["coverage"]) == 3  # every MoE layer


def test_cli_generate_equals_the_pruned_checkpoint(library, tmp_path, capsys):
    from moeprune.modelio import load_model

    prompt = json.loads(data_file(DATES, "eval").read_text().splitlines()[1])["prompt"]
    rc, out, err = run_cli(
        capsys, "generate", MODEL_DIR, "--library", library, "--prompt", prompt, "--max-new-tokens", "12"
    )
    assert rc == 0, err
    assert f"[{DATES}] loaded {3 * KEEP} experts" in err
    pruned = tmp_path / "pruned"
    rc, _, err = run_cli(
        capsys, "prune", MODEL_DIR, "--plan", library / "plans" / f"{DATES}.plan.json", "--out", pruned
    )
    assert rc == 0, err
    lm, tok = load_model(str(pruned))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    ref = lm.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    answer = tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert "\n" in answer  # the testbed ends an answer with a newline (then EOS)
    # the prompt, then its answer up to the end of the line (as `moeprune eval` reads it)
    assert out == f"> {prompt.rstrip()}\n{answer.split(chr(10))[0]}\n"


def test_cli_generate_shows_each_prompt_with_its_answer(library, tmp_path, capsys):
    prompts = [json.loads(x)["prompt"] for x in data_file(DATES, "eval").read_text().splitlines()[:2]]
    prompts.append("reverse: a b c\n=> ")
    args = ["generate", MODEL_DIR, "--library", library, "--max-new-tokens", "24"]
    result = tmp_path / "gen.json"
    rc, out, err = run_cli(capsys, *args, *(x for p in prompts for x in ("--prompt", p)), "-o", result)
    assert rc == 0, err
    data = json.loads(result.read_text())["results"]
    blocks = out.rstrip("\n").split("\n\n")  # one block per prompt, a blank line between
    assert len(blocks) == 3
    for block, p, r in zip(blocks, prompts, data, strict=True):
        quoted = "".join(f"> {line}\n" for line in p.rstrip().splitlines())
        assert block == quoted + r["output"]
        assert r["output"].strip() and "\n" not in r["output"] and r["ended_by"] == "stop"
    # --stop '': only the model's end of sequence ends the answer (the testbed's: newline, EOS)
    rc, out, err = run_cli(capsys, *args, "--prompt", prompts[0], "--stop", "", "-o", result, "--force")
    assert rc == 0, err
    whole = json.loads(result.read_text())["results"][0]
    assert whole["ended_by"] == "eos" and whole["output"] == data[0]["output"] + "\n"


def test_cli_generate_ends_at_the_generation_config_eos(library, tmp_path, capsys):
    """An end-of-turn id listed only in generation_config.json (as chat checkpoints do) ends the
    answer, as `from_pretrained` + `generate` would."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    prompt = "Date 2026-11-23 in words: "
    args = ["generate", model, "--library", library, "--task", DATES, "--prompt", prompt, "--stop", ""]
    result = tmp_path / "gen.json"
    rc, _, err = run_cli(capsys, *args, "-o", result)
    assert rc == 0, err
    full = json.loads(result.read_text())["results"][0]["output"]
    tok = AutoTokenizer.from_pretrained(model)
    answer_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert len(answer_ids) >= 3
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.eos_token_id, answer_ids[2]]  # ends after the answer's second token
    (model / "generation_config.json").write_text(json.dumps(gen))
    rc, out, err = run_cli(capsys, *args, "-o", result, "--force")
    assert rc == 0, err
    r = json.loads(result.read_text())["results"][0]
    assert r["output"] == tok.decode(answer_ids[:2]) and r["ended_by"] == "eos"


def test_cli_generate_forced_task_and_json(library, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Date 2001-02-03 in words: \nreverse: a b c\n")
    result = tmp_path / "gen.json"
    rc, out, err = run_cli(
        capsys, "generate", MODEL_DIR, "--library", library, "--file", prompts, "--task", REVERSE,
        "--max-new-tokens", "6", "-o", result,
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(result.read_text())["results"]
    assert [r["task"] for r in data] == [REVERSE, REVERSE] and data[0]["distances"] is None
    assert data[0]["switch"]["read_experts"] == 3 * KEEP and data[1]["switch"] is None  # loaded once
    assert out.count("\n") >= 2


def test_cli_chat_routes_each_conversation(library, capsys, monkeypatch):
    reverse_prompt = json.loads(data_file(REVERSE, "eval").read_text().splitlines()[0])["prompt"].split("\n")[
        0
    ]
    date_prompt = json.loads(data_file(DATES, "eval").read_text().splitlines()[0])["prompt"].strip()
    script = f"{date_prompt}\n/tasks\n/new\n{reverse_prompt}\n/task nope\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    rc, out, err = run_cli(capsys, "chat", MODEL_DIR, "--library", library, "--max-new-tokens", "8")
    assert rc == 0, err
    assert f"[{DATES}] loaded" in err and "new conversation" in err and "unknown task 'nope'" in err
    assert f"{DATES}, {REVERSE}" in out


def test_cli_chat_task_starts_a_new_conversation_and_far_queries_warn(library, capsys, monkeypatch):
    from moeprune.commands import generate

    seen: list[list[str]] = []
    real = generate.conversation_ids

    def spy(tokenizer, history):
        seen.append([turn["content"] for turn in history if turn["role"] == "user"])
        return real(tokenizer, history)

    monkeypatch.setattr(generate, "conversation_ids", spy)
    date_prompt = json.loads(data_file(DATES, "eval").read_text().splitlines()[0])["prompt"].strip()
    script = f"{date_prompt}\n/task {REVERSE}\nreverse: a b\nimport os, sys\n/new\nimport os, sys\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    rc, _, err = run_cli(capsys, "chat", MODEL_DIR, "--library", library, "--max-new-tokens", "4")
    assert rc == 0, err
    # after /task the conversation starts again: the date question is not in reverse's history
    assert seen[:3] == [[date_prompt], ["reverse: a b"], ["reverse: a b", "import os, sys"]]
    assert seen[3] == ["import os, sys"]
    assert f"[{REVERSE}] loaded" in err and "(new conversation)" in err
    # only the routed (first) message of a conversation is checked: the last one, far from both
    assert err.count("far from every task") == 1


def test_route_reports_the_distance_against_the_typical_one(library, tmp_path, capsys):
    index = json.loads((library / "library.json").read_text())
    lib = Library.load(library)
    for entry in index["tasks"]:  # written for reading, the same as computed from the keys
        assert entry["typical_distance"]["records"] == lib.typical_distance(entry["name"], "records")
        assert entry["typical_distance"]["records"]["records"] == 12
    prompt = json.loads(data_file(DATES, "eval").read_text().splitlines()[0])["prompt"]
    result = tmp_path / "r.json"
    rc, out, err = run_cli(capsys, "library", "route", library, prompt, "-o", result)
    assert rc == 0, err
    near = json.loads(result.read_text())["results"][0]
    assert not near["far"] and "far from every task" not in out and "typical distance" in out
    rc, out, err = run_cli(capsys, "library", "route", library, "import os, sys", "-o", result, "--force")
    assert rc == 0, err
    far = json.loads(result.read_text())["results"][0]
    assert far["far"] and "warning: the query is far from every task" in " ".join(out.split())
    typical = lib.typical_distance(far["task"], "records")["p95"]
    assert far["typical_distance"] == typical and far["distances"][far["task"]] > 1.25 * typical
    # a library from before per-record keys cannot tell: it says so instead of warning
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    import shutil

    shutil.copytree(library, old)
    tensors = {k: v for k, v in load_file(old / "keys.safetensors").items() if not k.endswith(".records")}
    save_file(tensors, old / "keys.safetensors", metadata={"format": "moeprune-library/1"})
    rc, out, err = run_cli(capsys, "library", "route", old, "import os, sys", "-o", result, "--force")
    assert rc == 0, err
    assert "no per-record keys" in " ".join(out.split())
    assert not json.loads(result.read_text())["results"][0]["far"]


def test_bad_input(library, tmp_path, capsys):
    from moeprune.testing.tiny import byte_tokenizer, tiny_model

    other = tmp_path / "other"
    tiny_model("qwen3_moe").save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    rc, _, err = run_cli(capsys, "generate", other, "--library", library, "--prompt", "hi")
    assert_user_error(rc, err, "was built for model", "library build")
    rc, _, err = run_cli(capsys, "library", "route", library, "x", "--model", other)
    assert_user_error(rc, err, "was built for model")
    empty = tmp_path / "empty"
    empty.mkdir()
    index = json.loads((library / "library.json").read_text())
    (empty / "library.json").write_text(json.dumps({**index, "tasks": []}))
    rc, _, err = run_cli(capsys, "library", "route", empty, "x")
    assert_user_error(rc, err, "holds no task")
    rc, _, err = run_cli(capsys, "library", "route", tmp_path / "missing", "x")
    assert_user_error(rc, err, "does not exist")
    rc, _, err = run_cli(
        capsys, "generate", MODEL_DIR, "--library", library, "--prompt", "x", "--task", "nope"
    )
    assert_user_error(rc, err, "no task 'nope'", DATES)
    rc, _, err = run_cli(capsys, "library", "route", library, "<|bos|>")
    assert_user_error(rc, err, "tokenises to nothing")
    rc, _, err = run_cli(capsys, "library", "route", library, "  ")
    assert_user_error(rc, err, "empty")
    rc, _, err = run_cli(capsys, "library", "route", library, "x", "--key", "middle")
    assert_user_error(rc, err, "unknown key")
    rc, _, err = run_cli(
        capsys, "library", "build", MODEL_DIR, "--task", "dates", "--keep", "8", "--out", tmp_path / "l"
    )
    assert_user_error(rc, err, "NAME=PATH")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    out = tmp_path / "half"
    rc, _, err = run_cli(
        capsys, "library", "build", MODEL_DIR, "--task", f"a={data_file(DATES, 'calib')}", "--task", f"b={bad}",
        "--keep", "8", "--out", out, "-q",
    )  # fmt: skip
    assert_user_error(rc, err, "bad.jsonl:2")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".moeprune-library")]
    rc, _, err = run_cli(
        capsys, "library", "build", MODEL_DIR, "--task", f"a={bad}", "--keep", "33", "--out", out
    )
    assert_user_error(rc, err, "cannot keep 33")
    with pytest.raises(UserError, match="no task"):
        build_library({}, model="m", method="premoe", keep=8)


def test_cli_build_profiles_dir_is_created_and_checked(profiles, tmp_path, capsys):
    """--profiles-dir is made when missing (as --out is), and checked as every output up front: not
    inside the model folder, no profile of another run replaced without --force."""
    keep = tmp_path / "kept" / "profiles"  # neither folder exists
    calib = f"{DATES}={data_file(DATES, 'calib')}"

    def build(out, *more):
        return run_cli(
            capsys, "library", "build", MODEL_DIR, "--task", calib, "--task", f"{REVERSE}={profiles[REVERSE]}",
            "--keep", KEEP, "--max-samples", "12", "-q", "--out", out, *more,
        )  # fmt: skip

    rc, _, err = build(tmp_path / "lib1", "--profiles-dir", keep)
    assert rc == 0, err
    assert sorted(p.name for p in keep.iterdir()) == [f"{DATES}.profile.safetensors"]  # made from data only
    assert Profile.load(keep / f"{DATES}.profile.safetensors").meta["samples"] == 12
    info = Library.load(tmp_path / "lib1").tasks[DATES].info
    assert info["profile"] == str((keep / f"{DATES}.profile.safetensors").resolve())

    before = (keep / f"{DATES}.profile.safetensors").stat().st_mtime_ns
    rc, _, err = build(tmp_path / "lib2", "--profiles-dir", keep)
    assert_user_error(rc, err, "--profiles-dir", "already exists", "--force")
    assert not (tmp_path / "lib2").exists()
    assert (keep / f"{DATES}.profile.safetensors").stat().st_mtime_ns == before

    inside = MODEL_DIR / "profiles"
    rc, _, err = build(tmp_path / "lib3", "--profiles-dir", inside)
    assert_user_error(rc, err, "--profiles-dir", "inside the input model")
    assert not inside.exists() and not (tmp_path / "lib3").exists()

    rc, _, err = build(tmp_path / "lib4", "--profiles-dir", tmp_path / "lib4" / "profiles")
    assert_user_error(rc, err, "--profiles-dir", "library folder")

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    rc, _, err = build(tmp_path / "lib5", "--profiles-dir", a_file)
    assert_user_error(rc, err, "--profiles-dir", "not a folder")
    assert not (tmp_path / "lib5").exists()


def test_nearest_neighbour_numpy_and_faiss_agree():
    from moeprune.library import nearest

    g = torch.Generator().manual_seed(0)
    keys = torch.rand(7, 32, generator=g, dtype=torch.float64)
    query = torch.rand(32, generator=g, dtype=torch.float64)
    exact = torch.cdist(keys, query[None]).squeeze(1)
    by_numpy = nearest(keys, query, use_faiss=False)
    by_faiss = nearest(keys, query, use_faiss=True)  # the faiss extra is installed by .ci/run
    torch.testing.assert_close(by_numpy, exact)
    torch.testing.assert_close(by_faiss, exact, rtol=1e-5, atol=1e-5)
    assert int(by_faiss.argmin()) == int(exact.argmin())


def test_record_keys_are_each_demonstration_alone(profiles, tmp_path):
    """Row i of a task's `records` key is the `first` key of a profile of record i alone; a query
    goes to the task of its nearest record, and a library without them falls back to `first`."""
    from moeprune.library import task_keys
    from moeprune.profiling import run_profile

    lines = data_file(DATES, "calib").read_text().splitlines()[:2]
    made = {}
    for name, chosen in (("both", lines), ("a", lines[:1]), ("b", lines[1:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(x + "\n" for x in chosen))
        run_profile(
            model=str(MODEL_DIR), data=[str(tmp_path / f"{name}.jsonl")], out=tmp_path / name, quiet=True
        )
        made[name] = Profile.load(tmp_path / name)
    keys = task_keys(made["both"], 4)
    assert keys["records"].shape == (2, made["both"].num_experts)
    torch.testing.assert_close(keys["records"][0], task_keys(made["a"], 4)["first"])
    torch.testing.assert_close(keys["records"][1], task_keys(made["b"], 4)["first"])
    prof = Profile.load(profiles[DATES])
    assert task_keys(prof, prof.premoe_ka)["records"].shape[0] == prof.samples

    lib = build_library(
        {t: Profile.load(p) for t, p in profiles.items()}, model="m", method="premoe", keep=KEEP
    )
    assert lib.default_key == "records"
    query = lib.task(REVERSE).keys["records"][3]  # exactly one of reverse's demonstrations
    match = lib.match(query)
    assert match.task == REVERSE and match.distances[REVERSE] == 0.0 and match.key == "records"
    rows = lib.task(DATES).keys["records"]
    assert match.distances[DATES] == pytest.approx(float(torch.cdist(rows, query[None]).min()))

    del prof.tensors["sample_tokens"]  # a profile from before per-sample token counts
    old = build_library({DATES: prof}, model="m", method="premoe", keep=KEEP)
    assert old.default_key == "first" and old.match(query).key == "first"
    with pytest.raises(UserError, match="has no 'records' keys"):
        old.match(query, "records")


def test_chat_conversation_ids_with_and_without_a_template():
    from moeprune.commands.generate import conversation_ids
    from moeprune.testing.tiny import byte_tokenizer

    tok = byte_tokenizer()
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
    ]
    plain = conversation_ids(tok, history)
    assert tok.decode(plain) == "<s>hi yo\nagain "  # turns one after another, room for the reply
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    templated = conversation_ids(tok, history)
    assert tok.decode(templated) == "[user] hi\n[assistant] yo\n[user] again\n[assistant] "


def _tampered(library: Path, tmp_path: Path, index_edit=None, key_edit=None) -> Path:
    """A copy of ``library`` with its index and/or keys changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "lib"
    shutil.copytree(library, copy)
    if index_edit is not None:
        index = json.loads((copy / "library.json").read_text())
        index_edit(index)
        (copy / "library.json").write_text(json.dumps(index))
    if key_edit is not None:
        tensors = load_file(str(copy / "keys.safetensors"))
        key_edit(tensors)
        save_file(tensors, str(copy / "keys.safetensors"))
    return copy


def _first_task(index: dict) -> dict:
    return index["tasks"][0]


@pytest.mark.parametrize(
    "index_edit, key_edit, words",
    [
        (None, lambda t: t[next(k for k in t if k.endswith(".key.first"))].fill_(float("nan")), "non-finite"),
        (
            None,
            lambda t: t[next(k for k in t if k.endswith(".key.all"))].__setitem__(0, float("inf")),
            "non-finite",
        ),
        (None, lambda t: t[next(k for k in t if k.endswith(".scores"))].fill_(float("nan")), "non-finite"),
        (lambda i: _first_task(i).update(plan="../outside.plan.json"), None, "outside the library folder"),
        (lambda i: _first_task(i).update(plan="/etc/hostname"), None, "outside the library folder"),
        (lambda i: i.update(premoe_ka=0), None, "premoe_ka 0 is outside"),
        (lambda i: i.update(premoe_ka=1e9), None, "misses the model or settings"),
        (lambda i: i.update(premoe_ka=10**9), None, "premoe_ka 1000000000 is outside"),
        (lambda i: i.update(num_experts=2**70), None, "out of range"),
        (lambda i: i.update(keep="8"), None, "misses the model or settings"),
    ],
)
def test_tampered_library_is_refused(library, tmp_path, capsys, index_edit, key_edit, words):
    """Issue 11 #9, #11: NaN keys won every query at distance 0; a plan path outside the folder
    was read; premoe_ka 0 or 1e9 crashed later."""
    from moeprune.library import Library

    copy = _tampered(library, tmp_path, index_edit, key_edit)
    if index_edit is not None and "outside" in words:
        # a valid plan there, so that only the path is wrong
        plan = next((library / "plans").iterdir())
        (tmp_path / "outside.plan.json").write_text(plan.read_text())
    with pytest.raises(UserError, match=words):
        Library.load(copy)
    rc, _, err = run_cli(capsys, "library", "route", copy, "x")
    assert_user_error(rc, err, words)


def test_library_plan_symlink_out_of_the_folder(library, tmp_path):
    from moeprune.library import Library

    copy = _tampered(library, tmp_path)
    plan = next((copy / "plans").iterdir())
    (tmp_path / "elsewhere.json").write_text(plan.read_text())
    plan.unlink()
    plan.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UserError, match="outside the library folder"):
        Library.load(copy)


def test_nan_keys_are_refused_whatever_the_method(profiles):
    """The keys are PreMoe's statistic even when another method picks the experts (mone by default):
    a NaN there is one error, not a library that routes every query nowhere."""
    prof = Profile.load(profiles[REVERSE])
    name = "premoe_hist_f" if "premoe_hist_f" in prof.tensors else "premoe_f"
    prof.tensors[name] = prof.tensors[name].clone()
    prof.tensors[name][0, 0] = float("nan")  # every bin (entry) of one expert (token): some count
    with pytest.raises(UserError, match="retrieval keys"):
        build_library({REVERSE: prof}, model=str(MODEL_DIR), method="mone", keep=KEEP)
