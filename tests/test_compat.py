"""Checkpoints as trained elsewhere and the transformers API as it is now.

* ``output_router_logits: true`` (checkpoints saved after training with the router's auxiliary
  loss): every moeprune forward runs without the loss, a ragged output is written runnable, and
  ``moeprune.load`` takes transformers' loading kwargs;
* the KV cache is passed under the name the installed transformers takes (no deprecation warning).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

import moeprune
from moeprune.arch import find_moe_blocks
from moeprune.cli import main
from moeprune.evaluate.runners import greedy_generate
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import byte_tokenizer, tiny_model

AUX_TYPES = ["qwen3_moe", "mixtral", "deepseek_v3"]


def _save(model, d: Path) -> Path:
    model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id = 2, 0, 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def _run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "em.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i} + {3 * i} = ", "answer": str(4 * i)}) + "\n" for i in range(4))
    )
    (d / "ppl.jsonl").write_text(
        "".join(json.dumps({"text": f"the {i}th line of text\n"}) + "\n" for i in range(4))
    )
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + {i} ="}) + "\n" for i in range(4)))
    return d


@pytest.fixture(scope="module", params=AUX_TYPES)
def aux_pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(model type, the checkpoint saved with output_router_logits true, the same without)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    model = tiny_model(model_type)
    plain = _save(model, root / "plain")
    model.config.output_router_logits = True
    flagged = _save(model, root / "flagged")
    assert json.loads((flagged / "config.json").read_text())["output_router_logits"] is True
    return model_type, flagged, plain


def _eval_json(model_dir: Path, data: Path, out: Path) -> dict:
    code = _run(
        "eval", model_dir, "--task", f"em={data / 'em.jsonl'}", "--task", f"ppl={data / 'ppl.jsonl'}",
        "--batch-size", "2", "--max-new-tokens", "6", "--output", out,
    )  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())["tasks"]


def test_eval_runs_without_the_aux_loss(aux_pair, data, tmp_path):
    _, flagged, plain = aux_pair
    got = _eval_json(flagged, data, tmp_path / "flagged.json")
    want = _eval_json(plain, data, tmp_path / "plain.json")
    assert got["em"]["metrics"] == want["em"]["metrics"]
    assert got["ppl"]["metrics"]["perplexity"] == pytest.approx(want["ppl"]["metrics"]["perplexity"], rel=1e-6)


def test_self_generate_runs_without_the_aux_loss(aux_pair, data, tmp_path):
    _, flagged, plain = aux_pair
    for name, src in (("flagged", flagged), ("plain", plain)):
        out = tmp_path / f"{name}.profile.safetensors"
        args = ["--data", data / "prompts.jsonl", "--self-generate", "4", "--batch-size", "2", "-q"]
        assert _run("profile", src, *args, "--out", out) == 0
    demos = [(tmp_path / f"{n}.demos.jsonl").read_text() for n in ("flagged", "plain")]
    assert demos[0] == demos[1]


def test_compare_runs_without_the_aux_loss(data, tmp_path):
    model = tiny_model("qwen3_moe")
    model.config.output_router_logits = True
    src = _save(model, tmp_path / "m")
    profile = tmp_path / "p.profile.safetensors"
    assert _run("profile", src, "--data", data / "ppl.jsonl", "--out", profile, "-q") == 0
    out = tmp_path / "cmp"
    code = _run(
        "compare", src, "--profile", profile, "--task", f"em={data / 'em.jsonl'}", "--method", "easyep",
        "--keep", "0.5", "--batch-size", "2", "--max-new-tokens", "4", "--out", out,
    )  # fmt: skip
    assert code == 0
    assert any(out.iterdir())


def test_given_model_keeps_its_setting(data):
    """A model handed to moeprune (not loaded by it) runs without the loss and gets its flag back."""
    model = tiny_model("mixtral", output_router_logits=True)
    tok = byte_tokenizer()
    prompts = [tok(f"{i} + {i} =")["input_ids"] for i in range(3)]
    out = greedy_generate(model, tok, prompts, max_new_tokens=4, stop_ids=set())
    assert len(out) == 3 and all(len(o) == 4 for o in out)
    assert model.config.output_router_logits is True


def _ragged(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_model("qwen3_moe", output_router_logits=True)
    src = _save(model, tmp_path / "src")
    blocks = find_moe_blocks(model)
    kept = {b.layer: list(range(8 - 2 * i)) for i, b in enumerate(blocks)}  # 8, 6 experts
    result = rewrite_checkpoint(src, tmp_path / "out", kept)
    assert result.ragged
    return src, tmp_path / "out"


def test_ragged_output_is_written_runnable(tmp_path):
    _, out = _ragged(tmp_path)
    assert json.loads((out / "config.json").read_text())["output_router_logits"] is False
    model = moeprune.load(out, dtype=torch.float32)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # a forward with the config as written


def test_load_passes_loading_kwargs_through(tmp_path):
    _, out = _ragged(tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["output_router_logits"] = True  # a ragged checkpoint written before the fix
    (out / "config.json").write_text(json.dumps(config))
    model = moeprune.load(out, dtype=torch.float32, output_router_logits=False, use_cache=False)
    assert model.config.output_router_logits is False and model.config.use_cache is False
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    # ragged: the loss cannot be computed, so it is off even when not asked
    assert moeprune.load(out, dtype=torch.float32).config.output_router_logits is False


def test_uniform_output_keeps_the_flag(tmp_path):
    """A uniform output loads in stock transformers, whose generate runs with the flag: kept as trained."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3_moe", output_router_logits=True)
    src = _save(model, tmp_path / "src")
    kept = {b.layer: list(range(6)) for b in find_moe_blocks(model)}
    rewrite_checkpoint(src, tmp_path / "out", kept)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["output_router_logits"] is True
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 6, 7]])
    stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)


def test_decoding_uses_the_current_cache_argument():
    """transformers 5.25 renamed past_key_values to cache (deprecation warning, removal planned)."""
    model = tiny_model("qwen3_moe")
    tok = byte_tokenizer()
    prompts = [tok(f"{i} + {i} =")["input_ids"] for i in range(2)]
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = greedy_generate(model, tok, prompts, max_new_tokens=5, stop_ids=set())
    finally:
        logger.removeHandler(handler)
    messages = records + [str(w.message) for w in caught]
    assert not [m for m in messages if "past_key_values" in m], messages
    # the same tokens as decoding the whole sequence each step without a cache (a row may stop
    # early at a newline)
    want = _no_cache_greedy(model, *prompts, n=5)
    assert all(o and o == w[: len(o)] for o, w in zip(out, want, strict=True)), (out, want)


def _no_cache_greedy(model, *prompts: list[int], n: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        new = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        outs.append(new)
    return outs


def test_loading_never_asks_for_hub_kernels(tmp_path, monkeypatch):
    """transformers >= 5.2x kernelizes a model loaded onto CUDA by default, downloading kernels from
    the Hub at run time (seen on a GPU: profile died on the kernels' trust check). Every moeprune
    load opts out unless the caller asks; the flag is what transformers reads, so spy on it."""
    from transformers import PreTrainedModel

    from moeprune.modelio import load_model

    d = _save(tiny_model("qwen3_moe"), tmp_path / "m")
    asked: list = []
    original = PreTrainedModel.set_use_kernels

    def spy(self, use_kernels, *args, **kwargs):
        asked.append(use_kernels)
        return original(self, use_kernels, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", spy)
    load_model(str(d))
    moeprune.load(d)
    assert asked == [False, False]
