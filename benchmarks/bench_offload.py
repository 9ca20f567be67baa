"""Sequential offload: peak memory of `calibrate_sequential` on a checkpoint larger than it may use.

Generates a random DeepSeek-V3-style checkpoint in the hub layout (one key per expert, as the real
DeepSeek-V3 is stored; bf16, hidden 1024, 64 routed experts in 8 groups, top-8, 1 dense layer +
16 MoE layers, about 3.4 GB in several shards) in a temporary folder, writing it shard by shard
from a small pool of random bytes (no model is built in memory; key names and shapes come from the
model built on the meta device and transformers' own reverse conversion). Then it profiles a few
records with ``calibrate_sequential`` (dtype bfloat16, as stored) in a child process and reports
its peak RSS against the checkpoint size and against the largest decoder layer, and its time
against the time of reading every layer alone and of converting + computing (goal: whole call <=
1.2 x the larger of the two), with the prefetch thread on and off (``--repeats`` alternating runs,
medians; the peak RSS is that of all runs).

The child reports its own high-water mark (``VmHWM`` in ``/proc/self/status``): on Linux
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` inherits the parent's high-water mark across fork + exec.
Everything generated is deleted at the end.

    python benchmarks/bench_offload.py [--layers 16] [--records 4] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import append_section, kv_table, write_random_dsv3

CHILD = r"""
import json, statistics, sys, time
import torch, transformers  # noqa: F401  (imported up front: their memory is reported separately)
from transformers import DeepseekV3ForCausalLM  # noqa: F401  (the model code, too)
from moeprune import offload
from moeprune.offload import ShardReader, calibrate_sequential

def hwm_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

torch.set_num_threads(int(sys.argv[5]))
base = hwm_kb()
src, records, length, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
repeats = int(sys.argv[6])
g = torch.Generator().manual_seed(0)
seqs = [torch.randint(3, 32000, (length,), generator=g).tolist() for _ in range(records)]
reader = ShardReader(src)
by_layer = {}
for key in reader.keys():
    if key.startswith("model.layers."):
        by_layer.setdefault(int(key.split(".")[2]), []).append(key)

def read_all():  # the bytes of every layer, one layer at a time, nothing else
    for i in sorted(by_layer):
        reader.read(by_layer[i])

runs = {"read": [], "lazy": [], "prefetch": []}
phases = {"lazy": [], "prefetch": []}
for _ in range(repeats):
    t0 = time.perf_counter()
    read_all()
    runs["read"].append(time.perf_counter() - t0)
    for name, on in (("lazy", False), ("prefetch", True)):
        offload.PREFETCH = on
        timings = {}
        t0 = time.perf_counter()
        out = calibrate_sequential(src, seqs, batch_size=batch, pad_id=0, dtype=torch.bfloat16, timings=timings)
        runs[name].append(time.perf_counter() - t0)
        phases[name].append(timings)
        print(name, round(runs[name][-1], 1), {k: round(v, 1) for k, v in timings.items()}, file=sys.stderr)
assert int(out["count"].sum()) == records * length * 8 * out["count"].shape[0]
assert all(bool(torch.isfinite(t).all()) for t in out.values() if t.is_floating_point())
med = {k: statistics.median(v) for k, v in runs.items()}
compute = statistics.median(p["compute"] + p["convert"] for p in phases["prefetch"])
print(json.dumps({"seconds": med["prefetch"], "lazy_seconds": med["lazy"], "read_seconds": med["read"],
                  "compute_seconds": compute, "hwm_after_imports_kb": base, "hwm_peak_kb": hwm_kb(),
                  "moe_layers": int(out["count"].shape[0])}))
"""

def layer_bytes(directory: Path) -> dict[int, int]:
    import re

    from moeprune.checkpoint import Checkpoint

    sizes: dict[int, int] = {}
    for key, info in Checkpoint.open(directory).tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if m:
            sizes[int(m.group(1))] = sizes.get(int(m.group(1)), 0) + info.nbytes
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="MoE layers (about 0.2 GB each)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--records", type=int, default=4)
    parser.add_argument("--length", type=int, default=256, help="tokens per record")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the child")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs (median)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="moeprune-bench-offload-", dir=args.dir))
    try:
        src = work / "src"
        src.mkdir()
        t0 = time.perf_counter()
        write_random_dsv3(src, args.layers, args.shards)
        gen_s = time.perf_counter() - t0
        on_disk = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        n_shards = len(list(src.glob("*.safetensors")))
        sizes = layer_bytes(src)
        print(f"generated {on_disk / 1e9:.2f} GB in {gen_s:.0f} s", file=sys.stderr)
        subprocess.run(["sync"], check=False)
        cmd = [sys.executable, "-c", CHILD, str(src), str(args.records), str(args.length)]
        cmd += [str(args.batch_size), str(args.threads), str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"calibrate_sequential failed:\n{proc.stderr}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    peak = child["hwm_peak_kb"] * 1024
    base = child["hwm_after_imports_kb"] * 1024
    layer = max(sizes.values())
    added = peak - base
    tokens = args.records * args.length
    rows = [
        (
            f"checkpoint (bf16, hub layout, {n_shards} shards)",
            f"{on_disk / 1e9:.2f} GB, {args.layers + 1} layers ({child['moe_layers']} MoE)",
        ),
        ("largest decoder layer", f"{layer / 1e6:.0f} MB"),
        ("records", f"{args.records} x {args.length} tokens, batch {args.batch_size}"),
        (
            "peak RSS of the calibration process",
            f"{peak / 1e6:.0f} MB = {100 * peak / on_disk:.1f}% of the checkpoint",
        ),
        ("  of which after imports (torch, transformers)", f"{base / 1e6:.0f} MB"),
        (
            "  added by calibrate_sequential",
            f"{added / 1e6:.0f} MB = {100 * added / on_disk:.1f}% of the checkpoint = {added / layer:.1f} x the largest layer",
        ),
        (
            "calibrate_sequential, whole call",
            f"{child['seconds']:.1f} s ({child['seconds'] / (args.layers + 1):.2f} s per layer, {tokens / child['seconds']:.0f} tok/s)",
        ),
        ("  reading every layer alone (`ShardReader.read`)", f"{child['read_seconds']:.1f} s"),
        ("  converting + computing (main thread, prefetch on)", f"{child['compute_seconds']:.1f} s"),
        (
            "  whole call / max(read, convert + compute): prefetch on (goal <= 1.2)",
            f"{child['seconds'] / max(child['read_seconds'], child['compute_seconds']):.2f}",
        ),
        (
            "  the same, prefetch off (`offload.PREFETCH = False`, reads inside the conversion)",
            f"{child['lazy_seconds']:.1f} s = "
            f"{child['lazy_seconds'] / max(child['read_seconds'], child['compute_seconds']):.2f}",
        ),
    ]
    table = kv_table(rows)
    print(table)
    if args.append is not None:
        line = (
            f"python benchmarks/bench_offload.py --layers {args.layers} --records {args.records} "
            f"--repeats {args.repeats} --append docs/benchmarks.md"
        )
        append_section(
            args.append,
            "Sequential offload",
            line,
            "source in the page cache",
            "Goal: peak RSS well under the checkpoint size.",
            table,
        )


if __name__ == "__main__":
    main()
