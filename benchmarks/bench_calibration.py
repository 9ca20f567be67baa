"""Calibration overhead: time of the calibration pass / time of a plain forward over the same data.

Both plain forwards are timed: the same ``patch_moe`` forward with no observer (same experts
implementation as calibration: the ratio is the cost of the statistics alone) and the model's stock
forward (its own experts implementation). Runs alternate in one process; the median is reported.

Models: (a) a random DeepSeek-V3-style model (hidden 1024, 64 routed experts, top-8, 4 MoE layers,
sequences of 512, batch 4); (b) the packaged testbed model, when ``src/moeprune/testbed/model``
holds a checkpoint.

    python benchmarks/bench_calibration.py [--repeats 3] [--batches 2] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from _models import dsv3_config
from moeprune.arch import find_moe_blocks, patch_moe
from moeprune.calibrate import Accumulator, _forward_kwargs, calibrate
from moeprune.data import batches

ROOT = Path(__file__).resolve().parents[1]


def dsv3_random():
    from transformers import AutoModelForCausalLM

    cfg = dsv3_config(4, first_dense=0, vocab_size=8192, moe_intermediate_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # diverse routing: router rows and correction bias of a trained model's scale
        for b in find_moe_blocks(model):
            b.router(model).weight.normal_(0, 0.05)
    return model


def testbed():
    from transformers import AutoModelForCausalLM

    from moeprune.testbed import MODEL_DIR

    if not (MODEL_DIR / "config.json").is_file():
        return None
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@torch.no_grad()
def measure(model, seq_len: int, batch_size: int, n_batches: int, repeats: int) -> dict[str, float]:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (seq_len,), generator=g).tolist() for _ in range(batch_size * n_batches)]
    blocks = find_moe_blocks(model)
    kwargs = _forward_kwargs(model)

    def stock() -> None:
        for b in batches(seqs, batch_size, 0):
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, **kwargs)

    def patched() -> None:
        with patch_moe(model, blocks) as session:
            for b in batches(seqs, batch_size, 0):
                session.token_mask = b.attention_mask.reshape(-1).bool()
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, **kwargs)

    def calib() -> None:
        calibrate(model, seqs, blocks=blocks, batch_size=batch_size)

    runs = {"stock": stock, "patched": patched, "calibrate": calib}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    stock()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  {name:9s} {wall[name][-1]:6.2f} s wall {cpu[name][-1]:6.2f} s cpu", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med.update({f"{k}_cpu": statistics.median(v) for k, v in cpu.items()})
    med["tokens"] = float(len(seqs) * seq_len)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=2, help="batches of 4 x 512 tokens per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--moments",
        choices=("auto", "loop", "vectorized"),
        default="auto",
        help="how the accumulator computes per-expert moments (auto: loop on CPU)",
    )
    ap.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.moments != "auto":
        Accumulator.moments_by_loop = args.moments == "loop"

    rows = []
    model = dsv3_random()
    print("(a) random DeepSeek-V3-style model", file=sys.stderr)
    rows.append(
        (
            "(a) DeepSeek-V3-style, random: hidden 1024, 64 experts, top-8, 4 MoE layers; 512 tok x 4",
            measure(model, 512, 4, args.batches, args.repeats),
        )
    )
    del model
    tb = testbed()
    if tb is not None:
        print("(b) testbed model", file=sys.stderr)
        n_pos = min(512, tb.config.get_text_config().max_position_embeddings)
        rows.append(
            (f"(b) testbed model; {n_pos} tok x 4", measure(tb, n_pos, 4, args.batches, args.repeats))
        )

    cmd = "python benchmarks/bench_calibration.py " + " ".join(
        f"--{k} {v}"
        for k, v in (("repeats", args.repeats), ("batches", args.batches), ("threads", args.threads))
    )
    lines = [
        "| model | tokens/run | stock forward | patched forward | calibration | calib / patched | calib / stock |"
        " calib / patched (CPU time) | calib / stock (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in rows:
        lines.append(
            f"| {label} | {int(m['tokens'])} | {m['stock']:.2f} s | {m['patched']:.2f} s | {m['calibrate']:.2f} s | "
            f"{m['calibrate'] / m['patched']:.3f} | {m['calibrate'] / m['stock']:.3f} | "
            f"{m['calibrate_cpu'] / m['patched_cpu']:.3f} | {m['calibrate_cpu'] / m['stock_cpu']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.append is not None:
        env = (
            f"torch {torch.__version__}, {args.threads} CPU threads ({platform.processor() or platform.machine()}), "
            f"float32, median of {args.repeats} alternating runs"
        )
        text = args.append.read_text() if args.append.exists() else "# Benchmarks\n"
        block = (
            f"\n## Calibration overhead\n\nCommand: `{cmd} --append docs/benchmarks.md` ({env}).\n\n{table}\n"
        )
        args.append.write_text(text.rstrip("\n") + "\n" + block)


if __name__ == "__main__":
    main()
