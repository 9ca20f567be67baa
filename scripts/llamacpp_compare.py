"""Helpers of scripts/check_llamacpp.sh: transformers vs the same weights in llama.cpp.

Subcommands (each run by the shell script in the right environment):

- ``prepare WORK``: the checkpoints (the testbed as shipped, a uniform prune of it, 16 of 32
  experts per layer, 4 per routing group, and a ``--pad-uniform`` prune of a ragged plan, 8/16/24
  experts in its three MoE layers padded to 24, and ``moeprune export --uniform`` of a
  ``--scope global`` prune of it; a tiny random Qwen3-MoE with the testbed's
  vocabulary and a uniform prune of it, 4 of 8 experts) and ``prompts.json`` (20 token-id prompts
  from the testbed's eval data), in moeprune's environment;
- ``convert VENDOR MODEL OUT.gguf``: llama.cpp's own ``convert_hf_to_gguf.py`` (f32). The testbed
  tokenizer is not one the converter knows by hash ("BPE pre-tokenizer was not recognized"), so
  its pre-tokenizer is recorded as ``default``: the comparison feeds token ids, never text. A
  DeepSeek-2/3 config without a query LoRA (``q_lora_rank: null``, as the testbed's) gets
  ``deepseek2.attention.q_lora_rank = 0`` in the GGUF (:func:`_no_q_lora_key`);
- ``llama MODEL.gguf PROMPTS OUT.npz``: in the llama-cpp-python venv (numpy + llama_cpp only):
  every prompt position's logits and a greedy continuation;
- ``compare MODEL OUT.npz PROMPTS [LABEL]``: the same in transformers (float32, ``moeprune.load``), then the
  verdict: identical greedy tokens on every prompt and the largest |logit difference|.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NEW_TOKENS = 16
PROMPTS_PER_DOMAIN = 4
LOGIT_TOLERANCE = 1e-3
TINY_TYPES = ("qwen3_moe",)  # tiny random models of more families
# what the hub's configs say and llama.cpp assumes (its qwen3moe graph always renormalises the
# top-k weights, whatever norm_topk_prob says)
TINY_OVERRIDES = {
    "qwen3_moe": {"norm_topk_prob": True}
}  # f32 GGUF vs transformers: summation orders differ, weights do not


def prepare(work: Path) -> None:
    from moeprune.modelio import load_tokenizer
    from moeprune.surgery import rewrite_checkpoint
    from moeprune.testbed import DOMAINS, MODEL_DIR, data_file

    work.mkdir(parents=True, exist_ok=True)
    kept = {layer: [g * 8 + i for g in range(4) for i in range(4)] for layer in (1, 2, 3)}
    out = work / "uniform16"
    if not out.exists():
        result = rewrite_checkpoint(MODEL_DIR, out, kept)
        assert result.stock, "a uniform prune loads with stock transformers"
    # ragged, equal routing groups (2, 4 and 6 of each group's 8 experts, different ones in every
    # layer), padded to 24 experts per layer with dead experts (selection bias -1e4)
    ragged = {
        layer: sorted(g * 8 + (layer + 3 * i) % 8 for g in range(4) for i in range(2 * layer))
        for layer in (1, 2, 3)
    }
    padded = work / "padded"
    if not padded.exists():
        result = rewrite_checkpoint(MODEL_DIR, padded, ragged, pad_uniform=True)
        assert result.stock and result.padded, "a pad-uniform prune loads with stock transformers"
    exported = _exported(work)
    for model_type in TINY_TYPES:
        _tiny(work, model_type)
    tok = load_tokenizer(MODEL_DIR)
    prompts = []
    for domain in DOMAINS:
        lines = data_file(domain, "eval").read_text(encoding="utf-8").splitlines()[:PROMPTS_PER_DOMAIN]
        for line in lines:
            row = json.loads(line)
            text = row.get("prompt") or row["text"][:120]
            prompts.append(tok(text).input_ids)
    (work / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")
    print(f"{len(prompts)} prompts, checkpoints: {MODEL_DIR}, {out}, {padded} and {exported}")


def _exported(work: Path) -> Path:
    """What a user of a ragged prune does for llama.cpp: a ``--scope global`` prune of the testbed
    (MoNE scores of the numbers domain, 16 experts per layer on average) and ``moeprune export
    --uniform`` of it (``WORK/exported``)."""
    from moeprune import api
    from moeprune.testbed import MODEL_DIR, data_file

    out = work / "exported"
    if out.exists():
        return out
    prof = work / "testbed-numbers.profile.safetensors"
    if not prof.exists():
        api.profile(MODEL_DIR, [data_file("numbers", "calib")], out=prof)
    ragged = work / "ragged"
    if not ragged.exists():
        api.prune(MODEL_DIR, api.plan(prof, "mone", 16, scope="global"), ragged, profile=prof)
    done = api.export_uniform(ragged, out)
    print(f"export --uniform: {done.uniform.source.kept_counts()} -> {done.uniform.plan.kept_counts()}")
    assert done.result.stock
    return out


def _tiny(work: Path, model_type: str) -> None:
    """A tiny random ``model_type`` with the testbed's vocabulary and tokenizer (``WORK/<type>``)
    and a uniform prune of it keeping half its experts (``WORK/<type>-uniform``)."""
    from moeprune.arch import find_moe_blocks
    from moeprune.surgery import rewrite_checkpoint
    from moeprune.testbed import MODEL_DIR
    from moeprune.testing.tiny import tiny_model

    src = work / model_type
    if not src.exists():
        model = tiny_model(
            model_type, vocab_size=2048, num_hidden_layers=3, **TINY_OVERRIDES.get(model_type, {})
        )
        model.save_pretrained(src, save_original_format=True)  # the hub's layout
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (src / name).write_bytes((MODEL_DIR / name).read_bytes())
        blocks = find_moe_blocks(model)
        kept = {b.layer: list(range(0, b.num_experts, 2)) for b in blocks}
        assert rewrite_checkpoint(src, work / f"{model_type}-uniform", kept).stock


def convert(vendor: Path, model: Path, out: Path) -> None:
    import runpy

    sys.path[:0] = [str(vendor), str(vendor / "gguf-py")]
    from conversion import base  # llama.cpp's converter package (vendored by llama-cpp-python)

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    _no_q_lora_key()
    sys.argv = [str(vendor / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32", "--outfile", str(out)]
    runpy.run_path(sys.argv[0], run_name="__main__")


def _no_q_lora_key() -> None:
    """Write ``deepseek2.attention.q_lora_rank = 0`` for DeepSeek-2/3 configs without a query LoRA.

    llama.cpp's deepseek2 loader (``src/models/deepseek2.cpp``, llama-cpp-python 0.3.36) skips the
    key only for 26 or 27 layers (``is_lite``: DeepSeek-V2-Lite) and otherwise requires it ("key
    not found in model"); the converter writes it only when ``q_lora_rank`` is set. With the key
    at 0 the loader takes the model's plain query projection (``attn_q``, as for V2-Lite), since
    it builds the query LoRA tensors only for a rank above 0. Metadata only: no weight changes.
    Real DeepSeek-V3/R1 checkpoints have a query LoRA (rank 1536) and never reach this."""
    from conversion.deepseek import DeepseekV2Model

    stock = DeepseekV2Model.set_gguf_parameters

    def set_gguf_parameters(self) -> None:
        stock(self)
        if type(self) is DeepseekV2Model and self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)
            print("moeprune check: no query LoRA in the config: deepseek2.attention.q_lora_rank = 0")

    DeepseekV2Model.set_gguf_parameters = set_gguf_parameters


def run_llama(gguf: Path, prompts_file: Path, out: Path) -> None:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    prompts = json.loads(prompts_file.read_text(encoding="utf-8"))
    # the KV cache in f32 too: llama.cpp keeps it in f16 by default, which alone moved the testbed's
    # logits by up to 2e-2 (DeepSeek-2/3 cache the compressed latent, where f16 rounding shows most)
    f32 = llama_cpp.GGML_TYPE_F32
    llm = Llama(
        model_path=str(gguf),
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        n_threads=2,
        verbose=False,
        type_k=f32,
        type_v=f32,
    )
    arrays = {}
    for i, ids in enumerate(prompts):
        llm.reset()
        llm.eval(ids)
        arrays[f"logits{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)
        greedy = []
        for _ in range(NEW_TOKENS):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(nxt)
            llm.eval([nxt])
        arrays[f"greedy{i}"] = np.array(greedy, dtype=np.int64)
    np.savez(out, **arrays)


def compare(model: Path, llama_out: Path, prompts_file: Path, label: str | None = None) -> int:
    import numpy as np
    import torch

    import moeprune

    torch.set_num_threads(2)
    lm = moeprune.load(model, dtype=torch.float32).eval()
    theirs = np.load(llama_out)
    prompts = json.loads(prompts_file.read_text(encoding="utf-8"))
    same, worst = 0, 0.0
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = lm(x).logits[0].numpy()
            greedy = []
            for _ in range(NEW_TOKENS):  # plain argmax loop, as on the llama.cpp side
                nxt = int(lm(x).logits[0, -1].argmax())
                greedy.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
        worst = max(worst, float(np.abs(logits - theirs[f"logits{i}"]).max()))
        same += greedy == theirs[f"greedy{i}"].tolist()
    ok = same == len(prompts) and worst <= LOGIT_TOLERANCE
    print(
        f"{label or model.name}: greedy identical on {same}/{len(prompts)} prompts ({NEW_TOKENS} tokens), "
        f"max |logit diff| {worst:.2e} over every prompt position: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


def main() -> int:
    cmd, *args = sys.argv[1:]
    if cmd == "prepare":
        prepare(Path(args[0]))
    elif cmd == "convert":
        convert(Path(args[0]), Path(args[1]), Path(args[2]))
    elif cmd == "llama":
        run_llama(Path(args[0]), Path(args[1]), Path(args[2]))
    elif cmd == "compare":
        return compare(Path(args[0]), Path(args[1]), Path(args[2]), *args[3:4])
    else:
        raise SystemExit(f"unknown subcommand {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
