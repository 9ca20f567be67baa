"""Calibration overhead: time of the calibration pass / time of a plain forward over the same data.

The plain forwards timed: the model's stock forward with each experts implementation transformers
offers that fits in memory (``grouped_mm``, its default, and ``eager``, its per-expert loop: the
goal is against the fastest), and the same ``patch_moe`` forward with no observer (the per-slot
experts implementation calibration runs: calib / patched is the cost of the statistics alone). Runs
alternate in one process; medians are reported.

Models (``--models``): ``dsv3``, a random DeepSeek-V3-style model (hidden 1024, 64 routed experts,
top-8, 4 MoE layers, sequences of 512, batch 4); ``qwen3``, a random Qwen3-MoE-like model (hidden
1024, 128 experts, top-8, 2 MoE layers, sequences of 512, batch 4); ``testbed``, the packaged
testbed model (sequences of 256, batch 4), when ``src/moeprune/testbed/model`` holds a checkpoint.

With ``--contend N``, N busy processes (one core each, ``while True: pass``) run beside every
measured run, as other jobs on a shared machine do; the table then also gives the range over the
rounds of calibration / fastest stock forward of the same round (wall time).

With ``--also-compiled``, the same calibration also runs with the accumulator's ``observe`` and
``_flush`` compiled by ``torch.compile`` (inductor fuses the statistics' element-wise passes and
reductions into a few loops): a measurement of what fused kernels would give and of what compiling
costs, not something moeprune does.

    python benchmarks/bench_calibration.py [--models dsv3,qwen3,testbed] [--dtype float32]
        [--threads 2] [--repeats 3] [--batches 2] [--contend 0] [--also-compiled]
        [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _models import dsv3_config, qwen3_config
from moeprune.arch import experts, find_moe_blocks, patch, patch_moe
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


def qwen3_random():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(qwen3_config(2), dtype=torch.float32).eval()


def testbed():
    from transformers import AutoModelForCausalLM

    from moeprune.testbed import MODEL_DIR

    if not (MODEL_DIR / "config.json").is_file():
        return None
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


STOCK_IMPLEMENTATIONS = ("grouped_mm", "eager")


@torch.no_grad()
def measure(
    model,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    repeats: int,
    also: str | None = None,
    also_fresh_rows: bool = False,
    also_compiled: bool = False,
) -> dict[str, float]:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (seq_len,), generator=g).tolist() for _ in range(batch_size * n_batches)]
    blocks = find_moe_blocks(model)
    kwargs = _forward_kwargs(model)

    def stock(impl: str):
        def run() -> None:
            model.set_experts_implementation(impl)
            try:
                for b in batches(seqs, batch_size, 0):
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, **kwargs)
            finally:
                model.set_experts_implementation("grouped_mm")

        return run

    def patched() -> None:
        with patch_moe(model, blocks) as session:
            for b in batches(seqs, batch_size, 0):
                session.token_mask = b.attention_mask.reshape(-1).bool()
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, **kwargs)

    def calib() -> None:
        calibrate(model, seqs, blocks=blocks, batch_size=batch_size)

    def calib_with(kernels: str):
        def run() -> None:
            experts.SLOT_KERNELS = kernels
            try:
                calib()
            finally:
                experts.SLOT_KERNELS = "auto"

        return run

    def calib_fresh_rows() -> None:  # a new [T*k, H] tensor per experts call, as before the shared buffer
        saved = patch.PatchSession.rows_buffer
        patch.PatchSession.rows_buffer = lambda self, n, like: None
        try:
            calib()
        finally:
            patch.PatchSession.rows_buffer = saved

    compiled: dict[str, object] = {}

    def calib_compiled() -> None:  # the statistics as torch.compile fuses them (a measurement only)
        saved = Accumulator.observe, Accumulator._flush, Accumulator.moments_by_loop
        if not compiled:
            compiled["observe"] = torch.compile(Accumulator.observe, dynamic=True)
            compiled["_flush"] = torch.compile(Accumulator._flush, dynamic=True)
        Accumulator.observe, Accumulator._flush = compiled["observe"], compiled["_flush"]
        Accumulator.moments_by_loop = False  # the large kernels: what inductor fuses
        try:
            calib()
        finally:
            Accumulator.observe, Accumulator._flush, Accumulator.moments_by_loop = saved

    runs = {f"stock {impl}": stock(impl) for impl in STOCK_IMPLEMENTATIONS}
    runs.update({"patched": patched, "calibrate": calib})
    if also is not None:  # the same calibration with other per-slot kernels, alternating with the rest
        runs["calibrate also"] = calib_with(also)
    if also_fresh_rows:
        runs["calibrate fresh rows"] = calib_fresh_rows
    if also_compiled:
        runs["calibrate compiled"] = calib_compiled
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    first: dict[str, float] = {}
    for name, fn in runs.items():  # warm-up (the compiled run's first call compiles)
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  {name:18s} {wall[name][-1]:6.2f} s wall {cpu[name][-1]:6.2f} s cpu", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med.update({f"{k}_cpu": statistics.median(v) for k, v in cpu.items()})
    per_round = [
        c / min(wall[f"stock {i}"][r] for i in STOCK_IMPLEMENTATIONS) for r, c in enumerate(wall["calibrate"])
    ]
    med["round_min"], med["round_max"] = min(per_round), max(per_round)
    fastest = min(STOCK_IMPLEMENTATIONS, key=lambda i: med[f"stock {i}"])
    med["stock"], med["stock_cpu"] = med[f"stock {fastest}"], med[f"stock {fastest}_cpu"]
    med["fastest"] = fastest  # type: ignore[assignment]
    med["tokens"] = float(len(seqs) * seq_len)
    med["first_compiled"] = first.get("calibrate compiled", float("nan"))
    med["first_calibrate"] = first["calibrate"]
    return med


MODELS = {
    "dsv3": ("DeepSeek-V3-style, random: hidden 1024, 64 experts, top-8, 4 MoE layers", dsv3_random, 512),
    "qwen3": ("Qwen3-MoE-like, random: hidden 1024, 128 experts, top-8, 2 MoE layers", qwen3_random, 512),
    "testbed": ("testbed model: hidden 128, 32 experts, top-4, 3 MoE layers", testbed, 256),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="dsv3,qwen3,testbed", help="comma-separated: dsv3, qwen3, testbed")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=2, help="batches of 4 sequences per run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--moments",
        choices=("auto", "loop", "vectorized"),
        default="auto",
        help="how the accumulator computes per-expert moments (auto: loop on CPU for large batches)",
    )
    ap.add_argument(
        "--also-kernels",
        choices=("grouped", "loop"),
        default=None,
        help="also time calibration with these per-slot kernels (arch.experts.SLOT_KERNELS), in the same "
        "process: grouped = all [T*k, H] rows in one gather (bf16 before the loop that sums as it goes), "
        "loop = the per-expert loop with the weighted sum gathered afterwards (float32 before)",
    )
    ap.add_argument(
        "--also-fresh-rows",
        action="store_true",
        help="also time calibration with a new per-slot rows tensor per experts call (before the shared buffer)",
    )
    ap.add_argument(
        "--also-compiled",
        action="store_true",
        help="also time calibration with the accumulator's observe and flush compiled by torch.compile "
        "(inductor; needs a C++ compiler), and the first call's time, which compiles",
    )
    ap.add_argument("--contend", type=int, default=0, help="busy processes running beside the measured runs")
    ap.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.moments != "auto":
        Accumulator.moments_by_loop = args.moments == "loop"
    dtype = getattr(torch, args.dtype)
    load = [os.getloadavg()[0]]

    rows = []
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
    try:
        measure_all(args, dtype, rows, load)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    report(args, rows, load)


def measure_all(args: argparse.Namespace, dtype: torch.dtype, rows: list, load: list[float]) -> None:
    for name in args.models.split(","):
        label, build, seq_len = MODELS[name]
        model = build()
        if model is None:
            continue
        model = model.to(dtype)
        print(f"{label} ({args.dtype}, {args.threads} threads)", file=sys.stderr)
        n_pos = min(seq_len, model.config.get_text_config().max_position_embeddings)
        m = measure(
            model, n_pos, 4, args.batches, args.repeats, args.also_kernels, args.also_fresh_rows, args.also_compiled
        )
        rows.append((f"{label}; {n_pos} tok x 4", m))
        load.append(os.getloadavg()[0])
        del model


def report(args: argparse.Namespace, rows: list, load: list[float]) -> None:
    cmd = "python benchmarks/bench_calibration.py " + " ".join(
        f"--{k} {v}"
        for k, v in (
            ("models", args.models),
            ("dtype", args.dtype),
            ("threads", args.threads),
            ("repeats", args.repeats),
            ("batches", args.batches),
            ("contend", args.contend),
        )
    ) + (" --also-compiled" if args.also_compiled else "")
    lines = [
        "| model | tokens/run | stock grouped_mm | stock eager | patched forward | calibration | calib / patched |"
        " calib / fastest stock | calib / fastest stock (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in rows:
        lines.append(
            f"| {label} | {int(m['tokens'])} | {m['stock grouped_mm']:.2f} s | {m['stock eager']:.2f} s | "
            f"{m['patched']:.2f} s | {m['calibrate']:.2f} s | {m['calibrate'] / m['patched']:.3f} | "
            f"{m['calibrate'] / m['stock']:.3f} | {m['calibrate_cpu'] / m['stock_cpu']:.3f} |"
        )
    if args.contend:
        lines.append("")
        lines.append(f"| model | calib / fastest stock of the same round, {args.contend} busy processes beside (wall) |")
        lines.append("|---|---|")
        for label, m in rows:
            lines.append(f"| {label} | {m['round_min']:.2f}-{m['round_max']:.2f} |")
    if args.also_kernels is not None:
        lines.append("")
        lines.append(f"| model | calib ({args.also_kernels}) / fastest stock (CPU time) | calib (auto) / fastest stock (CPU time) |")
        lines.append("|---|---|---|")
        for label, m in rows:
            lines.append(
                f"| {label} | {m['calibrate also_cpu'] / m['stock_cpu']:.3f} | {m['calibrate_cpu'] / m['stock_cpu']:.3f} |"
            )
    if args.also_fresh_rows:
        lines.append("")
        lines.append("| model | calib (fresh rows) / fastest stock (CPU time) | calib (one rows buffer) / fastest stock (CPU time) |")
        lines.append("|---|---|---|")
        for label, m in rows:
            lines.append(
                f"| {label} | {m['calibrate fresh rows_cpu'] / m['stock_cpu']:.3f} | {m['calibrate_cpu'] / m['stock_cpu']:.3f} |"
            )
    if args.also_compiled:
        lines.append("")
        lines.append(
            "| model | calib (compiled) / fastest stock | the same, CPU time | calib (eager) / fastest stock | "
            "first call: compiled (compiles) | first call: eager |"
        )
        lines.append("|---|---|---|---|---|---|")
        for label, m in rows:
            lines.append(
                f"| {label} | {m['calibrate compiled'] / m['stock']:.3f} | "
                f"{m['calibrate compiled_cpu'] / m['stock_cpu']:.3f} | {m['calibrate'] / m['stock']:.3f} | "
                f"{m['first_compiled']:.1f} s | {m['first_calibrate']:.2f} s |"
            )
    table = "\n".join(lines)
    print(table)
    loads = f"load {min(load):.1f}-{max(load):.1f}"
    print(loads, file=sys.stderr)
    if args.append is not None:
        env = (
            f"torch {torch.__version__}, {args.threads} CPU threads ({platform.processor() or platform.machine()}), "
            f"{args.dtype}, median of {args.repeats} alternating runs, {loads}"
        )
        text = args.append.read_text() if args.append.exists() else "# Benchmarks\n"
        block = f"\nCommand: `{cmd} --append docs/benchmarks.md` ({env}).\n\n{table}\n"
        args.append.write_text(text.rstrip("\n") + "\n" + block)


if __name__ == "__main__":
    main()
