"""What `--dtype auto` = bfloat16 changes on a CPU with bf16 units: rankings and speed.

1. Rankings on the testbed: one profile of the testbed model in float32 and one in bfloat16 over
   the same calibration records (every domain's ``calib`` split, ``--max-samples`` each); for each
   method (easyep, frequency, reap) and keep ratio, the experts each layer keeps (top-k of the
   scores) are compared: the share of kept experts the two profiles agree on (mean and worst layer)
   and how many layers keep exactly the same set.
2. Speed: ``calibrate()`` on the loaded model in float32 and in bfloat16, runs alternating in one
   process, median of ``--repeats``; on the testbed (hidden 128: small ops) and on a random
   DeepSeek-V3-style model (hidden 1024, 64 experts, top-8, 4 MoE layers, 4 x 512 tokens), where
   matrix units matter. The stock forward of each dtype is timed too, for scale.
3. ``--widths 128,512,1024``: instead of 1 and 2, where bfloat16 starts to pay on this CPU: the
   fastest stock forward (``grouped_mm`` or ``eager``) in float32 and in bfloat16, runs alternating,
   median of ``--repeats``, of random Qwen3-MoE-like models of each hidden size (64 experts, top-8,
   expert width hidden/4, 2 layers, 4 x 256 tokens) and of the testbed, with what ``--dtype auto``
   picks for each (``moeprune.device.resolve_dtype``; ``CPU_BF16_MIN_HIDDEN``).

    python benchmarks/bench_dtype.py [--repeats 3] [--threads 2] [--max-samples 40]
    python benchmarks/bench_dtype.py --widths 128,256,512,1024,2048 [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from _models import dsv3_config, qwen3_config
from moeprune import api
from moeprune.arch import find_moe_blocks
from moeprune.calibrate import _forward_kwargs, calibrate
from moeprune.data import batches
from moeprune.device import CPU_BF16_MIN_HIDDEN, cpu_runs_bf16_fast, resolve_dtype
from moeprune.score import score
from moeprune.testbed import DOMAINS, MODEL_DIR, data_file

METHODS = ("easyep", "frequency", "reap")
KEEPS = (0.5, 0.25)


def testbed(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype).eval()


def dsv3_random(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    cfg = dsv3_config(4, first_dense=0, vocab_size=8192, moe_intermediate_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # diverse routing, as bench_calibration.py
        for b in find_moe_blocks(model):
            b.router(model).weight.normal_(0, 0.05)
    return model.to(dtype)


def agreement(a: torch.Tensor, b: torch.Tensor, keep: float) -> tuple[float, float, int]:
    """(mean, worst) share of kept experts both score tensors [L, E] keep, and identical layers."""
    k = max(1, round(a.shape[1] * keep))
    shares = []
    for la, lb in zip(a, b, strict=True):
        sa, sb = set(la.topk(k).indices.tolist()), set(lb.topk(k).indices.tolist())
        shares.append(len(sa & sb) / k)
    return statistics.mean(shares), min(shares), sum(s == 1.0 for s in shares)


def rankings(max_samples: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    data = [data_file(d, "calib") for d in DOMAINS]
    profiles = {}
    for dt in (torch.float32, torch.bfloat16):
        lm = testbed(dt)
        lm.name_or_path = str(MODEL_DIR)
        profiles[dt] = api.profile(lm, data, tokenizer=tok, max_samples=max_samples, per_sample=False)
        print(f"  profiled in {dt}: {profiles[dt].tokens} tokens", file=sys.stderr)
    rows = [
        "| method | keep | kept experts in common (mean over layers) | worst layer | layers with the same kept set |",
        "|---|---|---|---|---|",
    ]
    p32, p16 = profiles[torch.float32], profiles[torch.bfloat16]
    for method in METHODS:
        s32, s16 = score(p32, method), score(p16, method)
        for keep in KEEPS:
            mean, worst, same = agreement(s32, s16, keep)
            rows.append(f"| {method} | {keep:.0%} | {mean:.1%} | {worst:.1%} | {same} of {s32.shape[0]} |")
    return rows


@torch.no_grad()
def speed(build, seq_len: int, batch_size: int, n_batches: int, repeats: int) -> dict[str, float]:
    models = {dt: build(dt) for dt in (torch.float32, torch.bfloat16)}
    vocab = models[torch.float32].config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (seq_len,), generator=g).tolist() for _ in range(batch_size * n_batches)]

    def stock(model) -> None:
        kwargs = _forward_kwargs(model)
        for b in batches(seqs, batch_size, 0):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, **kwargs)

    def calib(model) -> None:
        calibrate(model, seqs, batch_size=batch_size)

    times: dict[str, list[float]] = {}
    for m in models.values():
        stock(m)  # warm-up
    for _ in range(repeats):
        for dt, m in models.items():
            for name, fn in (("stock", stock), ("calibrate", calib)):
                t0 = time.perf_counter()
                fn(m)
                key = f"{name} {str(dt).removeprefix('torch.')}"
                times.setdefault(key, []).append(time.perf_counter() - t0)
                print(f"  {key:20s} {times[key][-1]:6.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    med["tokens"] = float(len(seqs) * seq_len)
    return med


def qwen3_of_width(hidden: int):
    def build(dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        cfg = qwen3_config(
            2,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            moe_intermediate_size=max(32, hidden // 4),
            num_experts=64,
            head_dim=max(16, hidden // 8),
            vocab_size=4096,
        )
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().to(dtype)

    return build


@torch.no_grad()
def stock_by_dtype(build, seq_len: int, repeats: int) -> tuple[dict[str, float], object]:
    """Median time of the fastest stock forward (grouped_mm or eager) per dtype over 4 x ``seq_len``."""
    models = {dt: build(dt) for dt in (torch.float32, torch.bfloat16)}
    config = models[torch.float32].config
    ids = torch.randint(3, config.get_text_config().vocab_size, (4, seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats + 1):  # the first round warms up
        for dt, m in models.items():
            for impl in ("grouped_mm", "eager"):
                m.set_experts_implementation(impl)
                t0 = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                times.setdefault((str(dt).removeprefix("torch."), impl), []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    best = {dt: min(t for (d, _), t in med.items() if d == dt) for dt in ("float32", "bfloat16")}
    return best, config


def widths(hidden_sizes: list[int], repeats: int) -> list[str]:
    rows = [
        f"| model | stock f32 | stock bf16 | bf16 / f32 | faster | `auto` picks (bf16 units: {cpu_runs_bf16_fast()}) |",
        "|---|---|---|---|---|---|",
    ]
    cases = [(f"Qwen3-MoE-like, hidden {h}", qwen3_of_width(h), 256) for h in hidden_sizes]
    if (MODEL_DIR / "config.json").is_file():
        cases.append(("testbed (hidden 128)", testbed, 256))
    for label, build, seq_len in cases:
        best, config = stock_by_dtype(build, seq_len, repeats)
        f32, b16 = best["float32"], best["bfloat16"]
        faster = "bfloat16" if b16 < f32 else "float32"
        rows.append(
            f"| {label} | {f32 * 1e3:.0f} ms | {b16 * 1e3:.0f} ms | {b16 / f32:.2f} | {faster} | "
            f"{resolve_dtype('auto', 'cpu', config)} |"
        )
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-samples", type=int, default=40, help="calibration records per testbed domain")
    ap.add_argument("--widths", default=None, help="comma-separated hidden sizes: only the stock forward by width")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bf16 units detected: {cpu_runs_bf16_fast()}; load {os.getloadavg()}", file=sys.stderr)
    if args.widths:
        print(f"threads {args.threads}; CPU_BF16_MIN_HIDDEN {CPU_BF16_MIN_HIDDEN}")
        print("\n".join(widths([int(w) for w in args.widths.split(",")], args.repeats)))
        print(f"load after: {os.getloadavg()}", file=sys.stderr)
        return
    print("\n".join(rankings(args.max_samples)))
    print()
    print(
        "| model | tokens/run | stock f32 | stock bf16 | calibrate f32 | calibrate bf16 | "
        "calib bf16 / calib f32 | calib bf16 / stock bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, build, seq_len in (
        ("testbed (hidden 128, 32 experts, top-4)", testbed, 256),
        ("DeepSeek-V3-style random (hidden 1024, 64 experts, top-8, 4 MoE layers)", dsv3_random, 512),
    ):
        m = speed(build, seq_len, 4, 2, args.repeats)
        f32, b16 = m["calibrate float32"], m["calibrate bfloat16"]
        print(
            f"| {label} | {int(m['tokens'])} | {m['stock float32']:.2f} s | {m['stock bfloat16']:.2f} s | "
            f"{f32:.2f} s | {b16:.2f} s | {b16 / f32:.2f} | {b16 / m['stock bfloat16']:.2f} |"
        )
    print(f"load after: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
