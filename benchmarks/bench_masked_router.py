"""A masked stock forward on a Qwen3-MoE-like model / the written pruned checkpoint's.

`compare`'s masked rows run the experts module's own forward under a steered router. Now the router
computes only the kept experts' logits (``ArchFacts.logits_only``) and routes them as the pruned
checkpoint's router would, and the experts module sees only the kept experts, moved in front of its
tensors (:mod:`moeprune.arch.compact`). Timed, alternating in one process (each run a session as a
row opens one, warmed by one forward, then the median of ``--forwards`` forwards; medians of
``--repeats`` runs, CPU time): the pruned checkpoint (the reference), the masked row now, the masked
row with the experts over all E (before), and that without the logits-only entry (before both). Also
printed: a row's setup (the experts moved in front and back), in forwards of the pruned checkpoint.
Model: ``_models.qwen3_config`` (hidden 1024, 128 experts, top-8) with random weights.

    python benchmarks/bench_masked_router.py [--layers 2] [--tokens 64] [--batch 4] [--dtype bfloat16]
        [--experts-implementation grouped_mm|eager] [--forwards 5] [--repeats 9]
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
from moeprune.arch import find_moe_blocks, kept_controls, patch, patch_moe
from moeprune.arch.compact import compactable
from moeprune.surgery import rewrite_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--forwards", type=int, default=5, help="forwards timed per session (median)")
    ap.add_argument("--experts-implementation", default="grouped_mm", choices=["grouped_mm", "eager"])
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
    full.set_experts_implementation(args.experts_implementation)
    pruned.set_experts_implementation(args.experts_implementation)
    masks = kept_controls(blocks, kept)
    entries = [b.logits_only for b in blocks]

    def session(with_entry: bool, in_front: bool):
        """A masked row's session (as `compare` opens one per row), warmed by one forward."""
        for b, own in zip(blocks, entries, strict=True):
            b.logits_only = own if with_entry else None
        patch.compactable = compactable if in_front else (lambda module: False)
        ctx = patch_moe(full, blocks, controls=masks, stock_experts=True)
        ctx.__enter__()
        full(x, use_cache=False)  # the kept experts move in front at the first forward
        return ctx

    variants = {  # name: (logits-only entry, kept experts in front)
        "masked, kept experts in front (now)": (True, True),
        "masked, all E experts (before)": (True, False),
        "masked, all E, router's own routing (before both)": (False, False),
    }
    cpu: dict[str, list[float]] = {"pruned checkpoint, stock": [], **{k: [] for k in variants}}
    setup: list[float] = []  # entering and leaving a row's session, kept experts moved and back
    out = {}
    print(f"load {os.getloadavg()}", file=sys.stderr)
    with torch.no_grad():
        out["pruned checkpoint, stock"] = pruned(x, use_cache=False).logits
        for r in range(args.repeats):  # alternating, the order flipping each round
            names = list(cpu) if r % 2 == 0 else list(cpu)[::-1]
            for name in names:
                ctx = None
                if name in variants:
                    c0 = time.process_time()
                    ctx = session(*variants[name])
                    if variants[name][1]:
                        setup.append(time.process_time() - c0)
                fn = (lambda: full(x, use_cache=False).logits) if ctx is not None else (lambda: pruned(x, use_cache=False).logits)
                times = []
                for _ in range(args.forwards):
                    c0 = time.process_time()
                    out[name] = fn()
                    times.append(time.process_time() - c0)
                cpu[name].append(statistics.median(times))
                if ctx is not None:
                    c0 = time.process_time()
                    ctx.__exit__(None, None, None)
                    if variants[name][1]:
                        setup[-1] += time.process_time() - c0
    patch.compactable = compactable
    for b, own in zip(blocks, entries, strict=True):
        b.logits_only = own
    print(f"load {os.getloadavg()}", file=sys.stderr)
    ref = statistics.median(cpu["pruned checkpoint, stock"])
    print(
        f"Qwen3-like, {args.layers} MoE layers, {E} experts (half kept), {args.dtype}, {args.batch} x {args.tokens} "
        f"tokens, {args.threads} thread(s), {args.experts_implementation} experts"
    )
    print("| run | median CPU per forward | / pruned checkpoint |")
    print("|---|---|---|")
    for name, ts in cpu.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.2f} ms | {m / ref:.3f} |")
    print(
        f"\nrow setup (session entered and left, kept experts moved in front and back): "
        f"{statistics.median(setup) * 1e3:.1f} ms = {statistics.median(setup) / ref:.1f} forwards of the pruned checkpoint"
    )
    same = torch.equal(out["masked, kept experts in front (now)"], out["pruned checkpoint, stock"])
    print(f"logits of the masked row (now) == the pruned checkpoint's, bit for bit: {same}")


if __name__ == "__main__":
    main()
