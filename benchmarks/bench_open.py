"""Opening a checkpoint again: Checkpoint.open on a checkpoint it parsed before / the first open.

One command opens a model's checkpoint several times (the plan check, the router digest, the
rewrite). A synthetic checkpoint with DeepSeek-V3's shard and tensor counts (163 shards, ~94k tensors: per-expert
keys with their fp8 scales, tiny tensors: the headers are what costs) is written to a temporary
folder; the first open parses every header, a later one checks that the index and header bytes are
the same and reuses the parse. Medians of alternating runs in one process (the cache is cleared
before each first open).

    python benchmarks/bench_open.py [--shards 163] [--experts 96] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from moeprune import checkpoint


def write_checkpoint(d: Path, shards: int, experts: int) -> int:
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for e in range(experts):
            for p in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{s}.mlp.experts.{e}.{p}"
                tensors[f"{key}.weight"] = np.zeros((2, 2), np.float32)
                tensors[f"{key}.weight_scale_inv"] = np.zeros((1,), np.float32)
        save_file(tensors, str(d / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return len(weight_map)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=163)
    ap.add_argument("--experts", type=int, default=96, help="experts per shard (96: ~94k tensors, as DeepSeek-V3 fp8)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        n = write_checkpoint(d, args.shards, args.experts)
        first, again = [], []
        for _ in range(args.repeats):
            checkpoint._OPENED.clear()
            t0 = time.perf_counter()
            checkpoint.Checkpoint.open(d)
            t1 = time.perf_counter()
            checkpoint.Checkpoint.open(d)
            t2 = time.perf_counter()
            first.append(t1 - t0)
            again.append(t2 - t1)
    f, a = statistics.median(first), statistics.median(again)
    print("| shards | tensors | first open | open again | again / first |\n|---|---|---|---|---|")
    print(f"| {args.shards} | {n} | {f:.3f} s | {a:.3f} s | {a / f:.3f} |")


if __name__ == "__main__":
    main()
