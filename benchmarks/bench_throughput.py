"""Where the pruned model's memory gain turns into throughput.

Two parts, labelled as what they are:

1. **Measured (CPU).** A random DeepSeek-V3-style model (hidden 1024, 64 experts in 8 groups,
   top-8, ``--layers`` MoE layers after one dense one) and two uniform prunes of it written by
   moeprune's rewrite (32 and 16 experts per layer, half / a quarter of every routing group).
   Prefill (``--prompt`` tokens) and greedy decode (``--new`` tokens, cache on) at several batch
   sizes, the three models alternating in one process, median of ``--repeats``. Printed: tokens/s
   and the pruned/full ratio. At batch 1 every model reads the same top-8 experts per token;
   as the batch grows the full model touches all 64 experts per step and the pruned one only
   its 32 or 16, so a memory-bound decode step gains up to the ratio of expert bytes.

2. **Computed (GPU serving memory).** For DeepSeek-R1, Qwen3-235B-A22B and gpt-oss-120b (their
   published layouts, :mod:`moeprune.testing.layouts`, headers only), the weights that
   `prune --dry-run` says each keep ratio writes, and the KV-cache room that leaves on a node at
   90% memory use (vLLM's default ``gpu_memory_utilization``): tokens of KV cache, hence how many
   4k-token sequences run at once. Decode on a GPU is bound by memory bandwidth until the batch is
   large, so concurrent sequences are throughput there. This is arithmetic from the headers and
   the attention shapes (bf16 KV cache; MLA's compressed cache for R1; gpt-oss's sliding-window
   layers hold at most 128 tokens), not a GPU measurement.

    python benchmarks/bench_throughput.py [--layers 4] [--batches 1,8,32,64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _models import dsv3_config

GB = 1e9
UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
NODES = {  # name -> bytes of GPU memory
    "1x H100 80GB": 80 * GB,
    "8x H100 80GB": 8 * 80 * GB,
    "8x H200 141GB": 8 * 141 * GB,
}
SERVING = {  # layout -> the node it is served on
    "deepseek-r1": "8x H200 141GB",
    "qwen3-235b-a22b": "8x H100 80GB",
    "gpt-oss-120b": "1x H100 80GB",
}


def kv_bytes_per_token(c: dict) -> tuple[int, int]:
    """(KV-cache bytes per token that grow with the context, bytes per sequence that do not), bf16."""
    layers = c["num_hidden_layers"]
    if "kv_lora_rank" in c:  # MLA: the compressed latent plus the shared rope key, per layer
        return layers * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * 2, 0
    per_layer = 2 * c["num_key_value_heads"] * c["head_dim"] * 2
    types = c.get("layer_types") or ["full_attention"] * layers
    full = sum(t == "full_attention" for t in types)
    window = (len(types) - full) * per_layer * (c.get("sliding_window") or 0)
    return full * per_layer, window


def computed_table(keeps: list[float]) -> list[str]:
    from moeprune import api
    from moeprune.testing.layouts import LAYOUTS, write_layout

    rows = [
        "| model | node (90% used) | experts kept | weights | KV room | KV tokens | 4k-token sequences | vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="moeprune-bench-throughput-") as tmp:
        for name, node in SERVING.items():
            src = write_layout(name, Path(tmp) / name)
            config = LAYOUTS[name].config
            per_token, per_seq = kv_bytes_per_token(config)
            budget = NODES[node] * UTILIZATION
            base = None
            for keep in [1.0, *keeps]:
                if keep == 1.0:
                    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
                    label = "all"
                else:
                    est = api.estimate_prune(src, keep=keep, bandwidth="1GB/s")
                    weights = sum(s.bytes for s in est.shards)
                    label = f"{est.kept[0]} ({keep:.0%})"
                room = budget - weights
                tokens = max(0, int(room // per_token)) if room > 0 else 0
                seqs = max(0.0, room / (4096 * per_token + per_seq)) if room > 0 else 0.0
                base = seqs if base is None else base
                vs = "-" if keep == 1.0 else ("fits only pruned" if base == 0 else f"{seqs / base:.1f}x")
                rows.append(
                    f"| {name} | {node} | {label} | {weights / GB:.0f} GB | {max(room, 0) / GB:.0f} GB | "
                    f"{tokens / 1e6:.2f} M | {int(seqs)} | {vs} |"
                )
    return rows


def measured_table(args: argparse.Namespace) -> list[str]:
    from transformers import AutoModelForCausalLM

    from moeprune.surgery import rewrite_checkpoint

    torch.manual_seed(0)
    config = dsv3_config(args.layers)
    models: dict[str, torch.nn.Module] = {}
    with tempfile.TemporaryDirectory(prefix="moeprune-bench-throughput-") as tmp:
        full_dir = Path(tmp) / "full"
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(full_dir)
        experts = config.n_routed_experts
        for per_group in (4, 2):  # of 8 experts per group
            kept = {layer: [e for e in range(experts) if e % 8 < per_group] for layer in range(1, config.num_hidden_layers)}
            rewrite_checkpoint(full_dir, Path(tmp) / f"keep{per_group * 8}", kept)
        dtype = getattr(torch, args.dtype)
        for name in ("full", "keep32", "keep16"):
            models[name] = AutoModelForCausalLM.from_pretrained(Path(tmp) / name, dtype=dtype).eval()

    def prefill(model: torch.nn.Module, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids)
        return time.perf_counter() - t0

    def decode(model: torch.nn.Module, ids: torch.Tensor) -> float:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(args.new):
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t0

    rows = [
        "| batch | phase | full tokens/s | 32/64 kept tokens/s | ratio | 16/64 kept tokens/s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in args.batches:
        ids = torch.randint(0, config.vocab_size, (batch, args.prompt))
        for phase, fn, tokens in (("prefill", prefill, batch * args.prompt), ("decode", decode, batch * args.new)):
            times: dict[str, list[float]] = {n: [] for n in models}
            fn(models["full"], ids)  # warm-up
            for _ in range(args.repeats):
                for name, model in models.items():
                    times[name].append(fn(model, ids))
            rate = {n: tokens / statistics.median(t) for n, t in times.items()}
            rows.append(
                f"| {batch} | {phase} | {rate['full']:.0f} | {rate['keep32']:.0f} | {rate['keep32'] / rate['full']:.2f}x "
                f"| {rate['keep16']:.0f} | {rate['keep16'] / rate['full']:.2f}x |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-measured", action="store_true", help="only the computed serving table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("\n".join(computed_table([0.5, 0.25])), flush=True)
    if not args.skip_measured:
        print(f"\nmeasured, {args.dtype}, {args.threads} threads, {args.layers} MoE layers:", flush=True)
        print("\n".join(measured_table(args)))


if __name__ == "__main__":
    main()
