"""Tests of the evaluation harness (`moeprune eval`, `moeprune.evaluate`).

Everything runs on a tiny random MoE (Qwen3-MoE, hidden 64, 2 layers, 8 experts, top-2) with a tiny
byte-level BPE tokenizer built here, compared against naive reimplementations of each protocol.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from moeprune.cli import main
from moeprune.errors import UserError
from moeprune.evaluate import Task, evaluate, load_task_file, parse_task_spec, resolve_tasks
from moeprune.evaluate import tasks as tasks_mod
from moeprune.evaluate.runners import (
    choice_loglikelihoods,
    encode,
    greedy_generate,
    run_exact_match,
    run_multiple_choice,
    run_perplexity,
)

LMEVAL_TASK_DIR = Path(__file__).parent / "data" / "lmeval_task"

CORPUS = [
    "the cat sat on the mat.\n",
    "one plus two is three\n",
    "Q: what is 2+2?\nA: 4\n",
    "def add(a, b):\n    return a + b\n",
]

PROMPTS = [
    "Q: what is 2+2?\nA:",
    "the",
    "one plus two is",
    "the cat sat on the mat. the cat sat on",
    "A: 4",
    "def add(a, b):",
    "two",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _qwen3_moe(vocab: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg).eval()


def _deepseek_v3(vocab: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, model, tokenizer) of a saved tiny random Qwen3-MoE."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    tok = _tokenizer()
    _qwen3_moe(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --------------------------------------------------------------------------------------------
# naive references


@torch.no_grad()
def naive_perplexity(model, tok, texts, max_length):
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"][:max_length]])
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        total -= float(logp[:-1].gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return total / count, count


@torch.no_grad()
def naive_greedy(model, tok, prompt, max_new_tokens=24):
    """Greedy decoding without cache, padding or batching: the prediction string."""
    ids = tok(prompt)["input_ids"]
    gen: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids + gen])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        gen.append(nxt)
        if "\n" in tok.decode(gen, skip_special_tokens=True):
            break
    return tok.decode(gen, skip_special_tokens=True).split("\n")[0].strip()


@torch.no_grad()
def naive_choice_ll(model, tok, prompt, choice):
    ctx, cont = prompt, choice
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        ctx, cont = prompt[:-spaces], prompt[-spaces:] + choice
    whole = tok(ctx + cont)["input_ids"]
    n_ctx = len(tok(ctx)["input_ids"])
    logp = model(input_ids=torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


# --------------------------------------------------------------------------------------------
# evaluators


def test_perplexity_matches_naive_float64(tiny, tmp_path):
    _, model, tok = tiny
    texts = [CORPUS[0] * 5, "a", CORPUS[1], CORPUS[2] * 3 + CORPUS[3], CORPUS[3] * 9]
    for batch_size, max_length in ((1, 1024), (3, 1024), (2, 17)):
        res = run_perplexity(
            model, tok, [{"text": t} for t in texts], batch_size=batch_size, max_length=max_length
        )
        nll, count = naive_perplexity(model, tok, texts, max_length)
        assert res["metrics"]["tokens"] == count
        assert res["metrics"]["nll"] == pytest.approx(nll, rel=1e-5)
        assert res["metrics"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    # a .txt task: one document per blank-line-separated block
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(t.strip("\n") for t in texts[:4]) + "\n\n\n")
    task = load_task_file(txt)
    assert (task.kind, task.name, len(task)) == ("perplexity", "docs", 4)
    assert [r["text"] for r in task.records] == [t.strip("\n") for t in texts[:4]]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_exact_match_batched_equals_unbatched(tiny, arch):
    _, model, tok = tiny
    if arch == "deepseek_v3":
        model = _deepseek_v3(len(tok))
    encs = [encode(tok, p) for p in PROMPTS]
    assert len({len(e) for e in encs}) > 3  # really different lengths -> real left padding
    batched = greedy_generate(model, tok, encs, max_new_tokens=10, stop_ids=set())
    single = [greedy_generate(model, tok, [e], max_new_tokens=10, stop_ids=set())[0] for e in encs]
    assert batched == single
    # stopping at an EOS id: the generation ends before its first occurrence, in every row
    stop = batched[0][0]
    stopped = greedy_generate(model, tok, encs, max_new_tokens=10, stop_ids={stop})
    assert stopped[0] == []
    assert stopped == [g[: g.index(stop)] if stop in g else g for g in batched]
    records = [{"prompt": p, "answer": "?"} for p in PROMPTS]
    preds = {
        bs: [
            s["prediction"]
            for s in run_exact_match(model, tok, records, batch_size=bs, log_samples=True)["samples"]
        ]
        for bs in (1, 3, len(records))
    }
    assert preds[1] == preds[3] == preds[len(records)]


def test_exact_match_scores_the_greedy_answer(tiny):
    _, model, tok = tiny
    expected = [naive_greedy(model, tok, p) for p in PROMPTS]
    # right answers for even records, wrong ones for odd records; surrounding blanks are stripped
    records = [
        {"prompt": p, "answer": f"  {e} " if i % 2 == 0 else e + "#wrong"}
        for i, (p, e) in enumerate(zip(PROMPTS, expected, strict=True))
    ]
    res = run_exact_match(model, tok, records, batch_size=4, log_samples=True)
    assert [s["prediction"] for s in res["samples"]] == expected
    assert [s["correct"] for s in res["samples"]] == [i % 2 == 0 for i in range(len(PROMPTS))]
    n = len(PROMPTS)
    p = 4 / n
    assert res["n"] == n
    assert res["metrics"]["accuracy"] == pytest.approx(p)
    assert res["metrics"]["accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


def test_multiple_choice_matches_naive(tiny):
    _, model, tok = tiny
    records = [json.loads(line) for line in (LMEVAL_TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    scores = choice_loglikelihoods(model, tok, records, batch_size=5)
    naive = [[naive_choice_ll(model, tok, r["prompt"], c) for c in r["choices"]] for r in records]
    for got, want in zip(scores, naive, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    res = run_multiple_choice(model, tok, records, batch_size=3)
    acc = sum(
        max(range(len(ll)), key=ll.__getitem__) == r["label"] for ll, r in zip(naive, records, strict=True)
    )
    acc_norm = sum(
        max(range(len(ll)), key=lambda i, ll=ll, r=r: ll[i] / len(r["choices"][i])) == r["label"]
        for ll, r in zip(naive, records, strict=True)
    )
    assert res["metrics"]["acc"] == pytest.approx(acc / len(records))
    assert res["metrics"]["acc_norm"] == pytest.approx(acc_norm / len(records))


def test_evaluate_api_limit_and_mode(tiny, tmp_path):
    _, model, tok = tiny
    em = _jsonl(tmp_path / "em.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS])
    model.train()
    try:
        out = evaluate(
            model,
            tok,
            [f"arith={em}", Task("docs", "perplexity", [{"text": t} for t in CORPUS])],
            limit=2,
            progress=False,
        )
        assert model.training  # the caller's mode is restored
    finally:
        model.eval()
    assert set(out["tasks"]) == {"arith", "docs"}
    assert out["tasks"]["arith"]["n"] == 2 and out["tasks"]["docs"]["n"] == 2
    assert out["settings"]["limit"] == 2


# --------------------------------------------------------------------------------------------
# task specs and registry


def test_task_specs(tmp_path, monkeypatch):
    both = _jsonl(
        tmp_path / "both.eval.jsonl", [{"prompt": "p", "answer": "a", "choices": ["x", "y"], "label": 0}]
    )
    (task,) = parse_task_spec(str(both))
    assert (task.name, task.kind) == ("both", "multiple_choice")
    (task,) = parse_task_spec(f"mine=exact_match:{both}")
    assert (task.name, task.kind) == ("mine", "exact_match")
    (task,) = parse_task_spec(f"em:{both}")
    assert task.kind == "exact_match"

    data = tmp_path / "testbed_data"
    data.mkdir()
    _jsonl(data / "arith.eval.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    _jsonl(data / "prose.eval.jsonl", [{"text": "hello world"}])
    monkeypatch.setattr(tasks_mod, "testbed_data_dir", lambda: data)
    assert [(t.name, t.kind) for t in resolve_tasks(["testbed"])] == [
        ("arith", "exact_match"),
        ("prose", "perplexity"),
    ]
    assert [t.name for t in resolve_tasks(["testbed:prose"])] == ["prose"]
    assert [t.name for t in resolve_tasks(["p2=testbed:prose"])] == ["p2"]
    with pytest.raises(UserError, match="unknown testbed task 'nope'"):
        resolve_tasks(["testbed:nope"])
    monkeypatch.setattr(tasks_mod, "testbed_data_dir", lambda: None)
    with pytest.raises(UserError, match="testbed is not available"):
        resolve_tasks(["testbed"])


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_prints_table_and_writes_json(tiny, tmp_path, capsys):
    path, _, _ = tiny
    em = _jsonl(tmp_path / "arith.eval.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS])
    txt = tmp_path / "prose.txt"
    txt.write_text("\n\n".join(CORPUS))
    out = tmp_path / "results.json"
    code = main(
        [
            "eval",
            str(path),
            "--task", str(em),
            "--task", f"docs={txt}",
            "--task", f"mc={LMEVAL_TASK_DIR / 'tiny_mc.jsonl'}",
            "--limit", "3",
            "--batch-size", "2",
            "--device", "cpu",
            "--output", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for word in ("arith", "docs", "mc", "accuracy", "perplexity", "acc_norm", "exact_match"):
        assert word in captured.out
    data = json.loads(out.read_text())
    assert data["model"] == str(path)
    assert data["settings"]["limit"] == 3 and data["settings"]["dtype"] == "float32"
    assert data["settings"]["device"] == "cpu"
    assert set(data["tasks"]) == {"arith", "docs", "mc"}
    assert data["tasks"]["arith"]["kind"] == "exact_match" and data["tasks"]["arith"]["n"] == 3
    assert data["tasks"]["docs"]["metrics"]["perplexity"] > 1
    assert data["tasks"]["mc"]["kind"] == "multiple_choice"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _bad_inputs(tmp: Path, model: Path) -> list[tuple[list[str], str]]:
    """(argv, expected part of the error line) for every bad input."""
    not_json = tmp / "bad.jsonl"
    not_json.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n')
    no_field = _jsonl(tmp / "nofield.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}])
    empty = tmp / "empty.jsonl"
    empty.write_text("\n\n")
    layout = _jsonl(tmp / "layout.jsonl", [{"question": "a", "target": "b"}])
    bad_label = _jsonl(tmp / "label.jsonl", [{"prompt": "a", "choices": ["x", "y"], "label": 2}])
    good = _jsonl(tmp / "good.jsonl", [{"prompt": "a", "answer": "b"}])
    m = str(model)
    return [
        [("eval", *argv), msg]
        for argv, msg in [
            ([m, "--task", str(tmp / "missing.jsonl")], "does not exist"),
            ([m, "--task", str(not_json)], f"{not_json}:2: not valid JSON"),
            ([m, "--task", str(no_field)], f"{no_field}:2: missing field 'answer'"),
            ([m, "--task", str(empty)], "is empty"),
            ([m, "--task", str(layout)], "unknown record layout"),
            ([m, "--task", str(bad_label)], "field 'label'"),
            ([m, "--task", str(good), "--limit", "0"], "--limit must be a positive"),
            ([m, "--task", str(good), "--limit", "-3"], "--limit must be a positive"),
            ([m, "--task", str(good), "--batch-size", "0"], "--batch-size"),
            ([m, "--task", str(good), "--dtype", "float8"], "unknown dtype"),
            ([m, "--task", str(good), "--device", "tpu"], "unknown device"),
            ([m], "no task given"),
            ([m, "--task", str(good), "--task", str(good)], "given twice"),
            ([m, "--task", str(good), "--output", str(tmp / "nodir" / "r.json")], "does not exist"),
            ([str(tmp / "no_model"), "--task", str(good)], "does not exist"),
            (
                ["no-such-org-xyz/no-such-model", "--task", str(good)],
                "`hf download no-such-org-xyz/no-such-model`",
            ),
            ([m, "--task", "kind_typo:" + str(tmp / "x.jsonl")], "does not exist"),
        ]
    ]


def test_bad_inputs_exit_2_with_one_line(tiny, tmp_path, capsys):
    path, _, _ = tiny
    out = tmp_path / "never.json"
    for argv, message in _bad_inputs(tmp_path, path):
        code = main(list(argv) if "--output" in argv else [*argv, "--output", str(out)])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("moeprune: error: "), (argv, err)
        assert message in lines[0], (argv, lines[0])
        assert not out.exists()


def test_lm_eval_missing_is_a_user_error(tiny, tmp_path, capsys, monkeypatch):
    path, _, _ = tiny
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # makes `import lm_eval` fail
    code = main(["eval", str(path), "--lm-eval", "arc_easy"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "pip install 'moeprune[lmeval]'" in lines[0]


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness bridge


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval not installed (pip install 'moeprune[lmeval]')",
)
def test_lm_eval_local_task_offline(tiny, tmp_path, capsys, monkeypatch):
    import datasets

    path, _, _ = tiny
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.chdir(tmp_path)  # the YAML's relative data_files must not depend on the current directory
    out = tmp_path / "lm.json"
    argv = [
        "eval",
        str(path),
        "--lm-eval",
        "moeprune_tiny_mc",
        "--lm-eval-include",
        str(LMEVAL_TASK_DIR),
        "--device",
        "cpu",
    ]
    code = main([*argv, "--task", f"mc={LMEVAL_TASK_DIR / 'tiny_mc.jsonl'}", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "lm_eval:moeprune_tiny_mc" in captured.out
    tasks = json.loads(out.read_text())["tasks"]
    ours, theirs = tasks["mc"], tasks["lm_eval:moeprune_tiny_mc"]
    assert theirs["kind"] == "lm_eval" and theirs["n"] == ours["n"] == 8
    # same requests (context = prompt, continuation = choice), so the same accuracies
    assert theirs["metrics"]["acc"] == pytest.approx(ours["metrics"]["acc"])
    assert theirs["metrics"]["acc_norm"] == pytest.approx(ours["metrics"]["acc_norm"])
    assert theirs["metrics"]["acc_stderr"] == pytest.approx(ours["metrics"]["acc_stderr"])


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval not installed (pip install 'moeprune[lmeval]')",
)
def test_lm_eval_unknown_task_is_a_user_error(monkeypatch):
    import lm_eval.tasks

    from moeprune.evaluate.lm_eval_bridge import prepare_lm_eval

    class FakeManager:  # indexing lm-eval's real task tree takes seconds
        def __init__(self, include_path=None, include_defaults=True, **_):
            self.all_tasks = (["moeprune_tiny_mc"] if include_path else []) + (
                ["arc_easy"] if include_defaults else []
            )
            self.all_subtasks = self.all_tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeManager)
    assert isinstance(prepare_lm_eval(["moeprune_tiny_mc"], LMEVAL_TASK_DIR), FakeManager)
    assert isinstance(prepare_lm_eval(["arc_easy"]), FakeManager)
    with pytest.raises(UserError, match="unknown lm-eval task no_such_task"):
        prepare_lm_eval(["arc_easy", "no_such_task"], LMEVAL_TASK_DIR)
    with pytest.raises(UserError, match="--lm-eval-include path .* does not exist"):
        prepare_lm_eval(["arc_easy"], LMEVAL_TASK_DIR / "nope")


def _no_network(monkeypatch) -> list[str]:
    """Every socket connection or name lookup is recorded and refused."""
    import socket

    attempts: list[str] = []

    def refuse(*args, **_kwargs):
        attempts.append(repr(args[1:] if args and isinstance(args[0], socket.socket) else args)[:80])
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval not installed (pip install 'moeprune[lmeval]')",
)
def test_lm_eval_runs_offline_and_keeps_finished_results(tiny, tmp_path, capsys, monkeypatch):
    """No connection is attempted (the user did not opt in to downloads); a task whose dataset is
    not cached ends in one line naming it, exit 2, and the other results are still written."""
    import shutil

    import datasets
    import huggingface_hub.constants

    path, _, _ = tiny
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "MOEPRUNE_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    include = tmp_path / "tasks"
    shutil.copytree(LMEVAL_TASK_DIR, include)
    missing_yaml = (LMEVAL_TASK_DIR / "moeprune_tiny_mc.yaml").read_text()
    missing_yaml = missing_yaml.replace("task: moeprune_tiny_mc", "task: moeprune_hub_mc")
    missing_yaml = missing_yaml.replace("dataset_path: json", "dataset_path: moeprune-tests/never-cached")
    missing_yaml = missing_yaml.replace("dataset_kwargs:\n  data_files:\n    test: tiny_mc.jsonl\n", "")
    (include / "moeprune_hub_mc.yaml").write_text(missing_yaml)
    attempts = _no_network(monkeypatch)
    out = tmp_path / "lm.json"
    code = main(
        [
            "eval", str(path), "--lm-eval", "moeprune_hub_mc,moeprune_tiny_mc", "--lm-eval-include", str(include),
            "--task", f"mc={LMEVAL_TASK_DIR / 'tiny_mc.jsonl'}", "--device", "cpu", "--output", str(out),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("moeprune: error:")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "moeprune_hub_mc" in lines[0] and "moeprune-tests/never-cached" in lines[0]
    assert "--allow-download" in lines[0]
    assert f"the finished results are in {out}" in lines[0] and "wrote" not in err  # one line
    assert not attempts, attempts
    tasks = json.loads(out.read_text())["tasks"]
    assert set(tasks) == {"mc", "lm_eval:moeprune_tiny_mc"}
    assert tasks["lm_eval:moeprune_tiny_mc"]["metrics"]["acc"] == pytest.approx(tasks["mc"]["metrics"]["acc"])
    # the offline switches are restored after the run
    assert "HF_HUB_OFFLINE" not in __import__("os").environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"text": "abc \\ud800 def"}', "lone surrogate (\\ud800) at character 4"),
        ('{"prompt": "x", "choices": ["a", "b\\udc00"], "label": 0}', "lone surrogate (\\udc00)"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ],
)
def test_hostile_task_lines_are_one_line_errors(tmp_path, line, words):
    """Issue 11 #11: a lone surrogate reached the tokenizer (TypeError) and deep nesting raised
    RecursionError in `eval`; both name the file and line."""
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"t\.jsonl:2: .*{re.escape(words)}"):
        load_task_file(f)
