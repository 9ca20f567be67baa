"""A masked stock forward on a Qwen3-MoE-like model, with and without the table's logits-only entry.

`compare`'s masked rows run the experts module's own forward under a steered router. Where
``ArchFacts.logits_only`` is set, the router computes only the kept experts' logits and routes
them as the pruned checkpoint's router would; without it, the router runs its own routing over all
E experts and the mask is routed again on top. This times, alternating in one process (medians of
``--repeats``, CPU time), a forward over random tokens of: the written pruned checkpoint (the
reference), the full model masked with the entry (now), and the same with the entry removed
(before). Model: ``_models.qwen3_config`` (hidden 1024, 128 experts, top-8) with random weights.

    python benchmarks/bench_masked_router.py [--layers 2] [--tokens 64] [--batch 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _models import qwen3_config
from moeprune.arch import find_moe_blocks, kept_controls, patch_moe
from moeprune.surgery import rewrite_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(qwen3_config(args.layers), dtype=dtype).eval()
    blocks = find_moe_blocks(full)
    E = blocks[0].num_experts
    kept = {b.layer: list(range(0, E, 2)) for b in blocks}  # half of the experts
    x = torch.randint(0, full.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory(prefix="moeprune-bench-masked-") as tmp:
        full.save_pretrained(Path(tmp) / "full")
        rewrite_checkpoint(Path(tmp) / "full", Path(tmp) / "pruned", kept)
        pruned = AutoModelForCausalLM.from_pretrained(Path(tmp) / "pruned", dtype=dtype).eval()
    masks = kept_controls(blocks, kept)
    entries = [b.logits_only for b in blocks]

    def masked(with_entry: bool) -> torch.Tensor:
        for b, own in zip(blocks, entries, strict=True):
            b.logits_only = own if with_entry else None
        with patch_moe(full, blocks, controls=masks, stock_experts=True):
            return full(x, use_cache=False).logits

    runs = {
        "pruned checkpoint, stock": lambda: pruned(x, use_cache=False).logits,
        "masked, logits-only entry (now)": lambda: masked(True),
        "masked, router's own routing (before)": lambda: masked(False),
    }
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    out = {}
    print(f"load {os.getloadavg()}", file=sys.stderr)
    with torch.no_grad():
        for name, fn in runs.items():  # warm-up
            out[name] = fn()
        for r in range(args.repeats):  # alternating, the order flipping each round
            for name, fn in list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]:
                c0 = time.process_time()
                fn()
                cpu[name].append(time.process_time() - c0)
    print(f"load {os.getloadavg()}", file=sys.stderr)
    ref = statistics.median(cpu["pruned checkpoint, stock"])
    print(f"Qwen3-like, {args.layers} MoE layers, {E} experts (half kept), {args.dtype}, {args.batch} x {args.tokens} tokens, {args.threads} thread(s)")
    print("| run | median CPU | / pruned checkpoint |")
    print("|---|---|---|")
    for name, ts in cpu.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.1f} ms | {m / ref:.3f} |")
    diff = (out["masked, logits-only entry (now)"].float() - out["pruned checkpoint, stock"].float()).abs().max()
    print(f"\nmax |logits(masked, now) - logits(pruned)|: {diff:.3g}")


if __name__ == "__main__":
    main()
