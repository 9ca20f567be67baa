"""Greedy tokens of moeprune checkpoints: reference (moeprune.load) vs vLLM (scripts/check_vllm.sh).

    python scripts/vllm_compare.py tiny WORK MODEL_TYPE                 # moeprune's venv
    python scripts/vllm_compare.py reference OUT.json CKPT [CKPT ...]   # moeprune's venv
    python scripts/vllm_compare.py vllm REF.json                        # vLLM's venv

``tiny`` writes a tiny random model of another family (qwen3_moe, mixtral, gpt_oss) with the
testbed's vocabulary and tokenizer to WORK/MODEL_TYPE, to be pruned like the testbed; for gpt_oss
also a ragged prune of it (WORK/gpt_oss-ragged: the ``--scope global`` plans of a random gpt-oss
come out uniform, so the per-layer counts are set by hand). The reference writes each
checkpoint's prompt and output token ids, and the log-probability of every output token; the
vLLM side generates from the same prompt ids (no second tokenizer involved), prints how many
outputs are identical and, over the tokens both chose, the largest |log-probability difference|.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

NEW_TOKENS = 16
PER_DOMAIN = 4
# tiny random models: config overrides (the hub configs' flags: Qwen3-30B-A3B renormalises its
# top-8 weights, Mixtral always does; head_dim 32: vLLM's CPU attention refuses the tiny models'
# 16, it takes 32, 64, 80, ...), whether to take the testbed's special token ids, and for gpt-oss
# the ragged kept experts written by hand
TINY: dict[str, dict] = {
    "qwen3_moe": {"config": {"num_hidden_layers": 3, "norm_topk_prob": True, "head_dim": 32}},
    "mixtral": {"config": {"num_hidden_layers": 3, "head_dim": 32}},
    "gpt_oss": {
        "config": {
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "head_dim": 32,
        },
        "token_ids": True,
        "ragged": {0: [0, 1, 2], 1: [0, 1, 2, 3, 4, 5], 2: [1, 3, 5, 7], 3: [0, 2, 3, 4, 6]},
    },
}


def prompts() -> list[str]:
    from moeprune.testbed import data_file

    out = []
    for domain in ("dates", "numbers", "prose", "python", "reverse"):
        lines = data_file(domain, "eval").read_text(encoding="utf-8").splitlines()[:PER_DOMAIN]
        # prose and python rows are plain text: their first 60 characters make the prompt
        out += [row.get("prompt", row.get("text", "")[:60]) for row in map(json.loads, lines)]
    return out


def reference(out: str, checkpoints: list[str]) -> None:
    import torch

    import moeprune
    from moeprune.modelio import load_tokenizer

    result = {}
    for ckpt in checkpoints:
        # not AutoTokenizer: it would find a renamed checkpoint's remote code and ask on the terminal
        tok = load_tokenizer(ckpt)
        model = moeprune.load(ckpt, dtype=torch.float32).eval()
        rows = []
        for text in prompts():
            ids = tok(text, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = model.generate(
                    ids,
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            tokens = gen.sequences[0, ids.shape[1] :].tolist()
            logprobs = [
                float(torch.log_softmax(lg[0].float(), -1)[t])
                for lg, t in zip(gen.logits, tokens, strict=True)
            ]
            rows.append({"prompt_ids": ids[0].tolist(), "output_ids": tokens, "logprobs": logprobs})
        result[ckpt] = rows
    Path(out).write_text(json.dumps(result), encoding="utf-8")


def tiny(work: str, model_type: str) -> None:
    from moeprune.surgery import rewrite_checkpoint
    from moeprune.testbed import MODEL_DIR
    from moeprune.testing.tiny import tiny_model

    spec = TINY[model_type]
    ids = {}
    if spec.get("token_ids"):
        tokens = json.loads((MODEL_DIR / "config.json").read_text(encoding="utf-8"))
        ids = {k: tokens[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    src = Path(work) / model_type
    model = tiny_model(model_type, vocab_size=2048, **spec["config"], **ids)
    model.save_pretrained(src, save_original_format=True)  # the hub's layout (per-expert tensors)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((MODEL_DIR / name).read_bytes())
    if "ragged" in spec:
        out = rewrite_checkpoint(src, Path(work) / f"{model_type}-ragged", spec["ragged"], force=True)
        print(f"wrote {src} and its ragged prune ({out.kept_counts})")


def _deepseek_args(config: dict) -> dict:
    # the testbed's config predates the hub routing fields vLLM reads (stock path only)
    overrides: dict = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}
    layout = config.get("moeprune") or {}
    reshaped = layout.get("mode") == "novice" or any(
        n != config["n_routed_experts"] for n in (layout.get("experts_per_layer") or {}).values()
    )
    # stock vLLM's DeepSeek ignores tie_word_embeddings (the testbed ties; DeepSeek-V3 does not),
    # so a tied uniform checkpoint goes through the plugin's class too, which ties them
    tied = config.get("tie_word_embeddings", False)
    if (reshaped or tied) and config["architectures"] != ["MoepruneForCausalLM"]:
        # written before moeprune renamed ragged/novice architectures: name the plugin's class
        overrides["architectures"] = ["MoepruneDeepseekV3ForCausalLM"]
    return {
        "hf_overrides": overrides,
        # vLLM 0.32's CPU rotary op mis-rotates the [tokens, heads, 16] query slice of the
        # non-MLA DeepSeek attention (VLLM_MLA_DISABLE=1, needed for the testbed's MLA head
        # size 48); its torch version (forward_native) is right
        "compilation_config": {"custom_ops": ["-rotary_embedding"]},
    }


# base model type -> the vLLM engine arguments its checkpoints need in this check
ENGINE_ARGS = {
    "deepseek_v3": _deepseek_args,
    "qwen3_moe": lambda config: {},  # stock vLLM ops and the plugin as they are
    "mixtral": lambda config: {},
    "gpt_oss": lambda config: {},
}


def run_vllm(ref_path: str) -> int:
    from vllm import LLM, SamplingParams

    ref = json.loads(Path(ref_path).read_text(encoding="utf-8"))
    failed = 0
    for ckpt, rows in ref.items():
        start = time.time()
        config = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8"))
        base = (config.get("moeprune") or {}).get("base_model_type") or config["model_type"]
        llm = LLM(
            model=ckpt,
            dtype="float32",
            max_model_len=256,
            enforce_eager=True,
            seed=0,
            # on CPU this is the share of RAM vLLM reserves (KV cache); the machine may be shared
            gpu_memory_utilization=float(os.environ.get("VLLM_MEMORY_SHARE", "0.2")),
            **ENGINE_ARGS[base](config),
        )
        loaded = time.time() - start
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=False, logprobs=1)
        outs = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in rows], params)
        same, worst = 0, 0.0
        for r, o in zip(rows, outs, strict=True):
            got = list(o.outputs[0].token_ids)
            want = r["output_ids"]
            # transformers stops at EOS and includes it; vLLM includes it too
            same += got == want
            if got != want:
                print(f"  differs: want {want} got {got}")
            for i, (a, b) in enumerate(zip(got, want, strict=False)):
                if a != b:
                    break
                worst = max(worst, abs(o.outputs[0].logprobs[i][a].logprob - r["logprobs"][i]))
        arch = llm.apply_model(lambda model: type(model).__name__)[0]  # the class that ran
        print(
            f"{ckpt}: {same}/{len(rows)} identical greedy outputs, max |logprob diff| {worst:.1e} "
            f"(class {arch}, load {loaded:.1f}s)"
        )
        failed += same != len(rows)
        del llm
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1] == "tiny":
        tiny(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "reference":
        reference(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(run_vllm(sys.argv[2]))
