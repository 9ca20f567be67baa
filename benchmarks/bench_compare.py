"""Cost of one `compare` row: a masked evaluation against a stock evaluation of the pruned checkpoint.

On the testbed model, 16 of 32 experts are kept per layer (2 per routing group of 8, ...: half of
each group) and the same tasks are evaluated three ways, alternating in one process (median of
``--repeats``, wall and CPU time): (1) the written pruned checkpoint, loaded by transformers and run as it is (the
reference); (2) the full model under ``patch_moe`` with the removed experts masked, with the
experts module's own forward (``stock_experts=True``, what `compare` runs); (3) the same with
moeprune's per-slot experts forward (what `compare` ran before). Novice rows (MoNE constants for the
removed experts, router unchanged) are timed the same two ways. Goal: a masked row <= 1.0 x (1).

    python benchmarks/bench_compare.py [--repeats 3] [--limit 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeprune.arch import BlockControl, find_moe_blocks, kept_controls, patch_moe
from moeprune.evaluate.runners import evaluate
from moeprune.surgery import rewrite_checkpoint
from moeprune.testbed import MODEL_DIR, data_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--only",
        action="append",
        default=None,
        help="time only the runs whose name starts with this (repeatable)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    full = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    blocks = find_moe_blocks(full)
    E, H = blocks[0].num_experts, full.config.hidden_size
    kept = {b.layer: [i for i in range(E) if i % 8 < 4] for b in blocks}
    tasks = [f"numbers={data_file('numbers', 'eval')}", f"python={data_file('python', 'eval')}"]
    novices = {i: torch.randn(H) * 0.01 for i in range(E) if i % 8 >= 4}
    with tempfile.TemporaryDirectory(prefix="moeprune-bench-compare-") as tmp:
        out = Path(tmp) / "pruned"
        rewrite_checkpoint(MODEL_DIR, out, kept)
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

        def run(model, controls=None, stock=False):
            def go():
                with torch.no_grad():
                    return evaluate(model, tok, tasks, limit=args.limit, progress=False)

            if controls is None:
                return go()
            with patch_moe(model, blocks, controls=controls, stock_experts=stock):
                return go()

        masks = kept_controls(blocks, kept)
        nov = {b.index: BlockControl(novices=novices) for b in blocks}
        runs = {
            "pruned checkpoint, stock": lambda: run(pruned),
            "masked, stock experts (compare now)": lambda: run(full, masks, True),
            "masked, per-slot experts (before)": lambda: run(full, masks, False),
            "novice, stock experts (not used by compare)": lambda: run(full, nov, True),
            "novice, per-slot experts (compare)": lambda: run(full, nov, False),
        }
        if args.only:  # the reference always runs
            runs = {
                k: f
                for k, f in runs.items()
                if k == "pruned checkpoint, stock" or k.startswith(tuple(args.only))
            }
        times: dict[str, list[float]] = {k: [] for k in runs}
        cpu: dict[str, list[float]] = {
            k: [] for k in runs
        }  # CPU seconds: what a loaded machine distorts least
        results = {}
        print(f"load {os.getloadavg()}", file=sys.stderr)
        for r in range(args.repeats):  # alternating, the order flipping each round
            for name, fn in list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]:
                t0, c0 = time.perf_counter(), time.process_time()
                results[name] = fn()["tasks"]
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                print(f"  {name:40s} {times[name][-1]:6.2f} s", file=sys.stderr)
        print(f"load {os.getloadavg()}", file=sys.stderr)
    a, b = results["pruned checkpoint, stock"], results.get("masked, stock experts (compare now)")
    b = b if b is not None else a
    same = all(
        math.isclose(a[t]["metrics"][m], b[t]["metrics"][m], rel_tol=1e-6) for t in a for m in a[t]["metrics"]
    )  # float32 sums in another order: perplexities agree to ~1e-9
    ref = statistics.median(times["pruned checkpoint, stock"])
    cref = statistics.median(cpu["pruned checkpoint, stock"])
    print("| run | median wall | / pruned checkpoint | median CPU | / pruned checkpoint |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        m, c = statistics.median(ts), statistics.median(cpu[name])
        print(f"| {name} | {m:.2f} s | {m / ref:.2f} | {c:.2f} s | {c / cref:.2f} |")
    print(f"\nmasked metrics equal the pruned checkpoint's (rel. 1e-6): {same}")


if __name__ == "__main__":
    main()
