"""Plans at full scale: `prune --dry-run` and `profile --dry-run` on DeepSeek-R1, Qwen3-235B-A22B
and gpt-oss-120b, and what the dry run itself costs.

Each model is written as its headers-only layout (:mod:`moeprune.testing.layouts`: every shard a
valid safetensors header followed by a hole, ~0 disk) in a temporary folder, then each dry run
runs as the command a user types, in a fresh process (``python -m moeprune ... --dry-run
--json``), timed from the outside (imports included) and with its own peak RSS. The time
estimates use ``--bandwidth``: given, or measured here by reading back a 512 MiB file written to
the temporary folder (fsync-ed, its cached pages dropped first), since the layouts' holes cannot
be timed.

It also checks the profile memory model against a measured run: the estimate for the checkpoint
of ``bench_offload.py`` (random DeepSeek-V3-style bf16, 1 dense + 16 MoE layers, 4 records x 256
tokens, batch 2, bfloat16), written here headers-only, next to the peak RSS that benchmark
measured (docs/benchmarks.md, "Sequential offload": 904 MB).

    python benchmarks/bench_dry_run.py [--keep 0.5] [--records 128] [--bandwidth 1.5GB/s]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import dsv3_config, dsv3_entries

LAYOUT_NAMES = ("deepseek-r1", "qwen3-235b-a22b", "gpt-oss-120b")
MEASURED_OFFLOAD_PEAK = 904e6  # docs/benchmarks.md, "Sequential offload" (VmHWM of the child)


def run_dry(args: list[str]) -> tuple[dict, float, int]:
    """(the JSON estimate, wall seconds, peak RSS bytes) of ``moeprune ARGS --json`` in a fresh process."""
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "moeprune", *args, "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"moeprune {' '.join(args)} failed:\n{proc.stderr}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout), seconds, peak_kb * 1024


def measure_disk(work: Path) -> float:
    """Bytes/s of reading back a 512 MiB file written (and fsync-ed) here, its pages dropped first."""
    from moeprune.estimate import measure_bandwidth

    path = work / "bandwidth.bin"
    block = os.urandom(16 * 2**20)
    with open(path, "wb") as fh:
        for _ in range(32):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    bw = measure_bandwidth([path])
    path.unlink()
    if bw.bytes_per_s is None:
        sys.exit(f"could not measure the disk: {bw.source}")
    print(f"disk: {bw.bytes_per_s / 1e9:.2f} GB/s ({bw.source})", file=sys.stderr)
    return bw.bytes_per_s


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def minutes(s: float | None) -> str:
    return "-" if s is None else f"{s / 60:.1f} min"


def offload_check(work: Path) -> tuple[int, list[tuple[str, int]]]:
    """The estimate for bench_offload.py's checkpoint (headers only) and its items."""
    from transformers.core_model_loading import revert_weight_conversion

    from moeprune.estimate import profile_estimate
    from moeprune.modelio import build_on_meta
    from moeprune.testing.layouts import write_headers_only

    src = work / "offload"
    src.mkdir()
    cfg = dsv3_config(16, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(src)
    meta = build_on_meta(cfg)
    entries = dsv3_entries(revert_weight_conversion(meta, meta.state_dict()))
    names = [f"model-{i + 1:05d}-of-00008.safetensors" for i in range(8)]
    write_headers_only([(k, d, s) for k, d, s, _ in entries], src, names)
    est = profile_estimate(
        src,
        records=4,
        tokens=4 * 256,
        max_length=256,
        batch_size=2,
        offload="sequential",
        dtype="bfloat16",
        device="cpu",
        bandwidth=1e9,
    )
    return est.peak_memory, est.memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default="0.5", help="experts kept per layer (count or fraction)")
    parser.add_argument("--records", type=int, default=128, help="calibration records of --max-length tokens")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--bandwidth", default=None, help="e.g. 1.5GB/s (default: measured here)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    from moeprune.testing.layouts import PUBLISHED, write_layout

    work = Path(tempfile.mkdtemp(prefix="moeprune-bench-dry-run-", dir=args.dir))
    try:
        from moeprune.estimate import parse_bandwidth

        bandwidth = f"{parse_bandwidth(args.bandwidth):.0f}" if args.bandwidth else f"{measure_disk(work):.0f}"
        rows = []
        for name in LAYOUT_NAMES:
            t0 = time.perf_counter()
            d = write_layout(name, work / name)
            made = time.perf_counter() - t0
            common = ["--dry-run", "--bandwidth", bandwidth]
            prune, prune_s, prune_rss = run_dry(["prune", str(d), "--keep", args.keep, *common])
            prof = ["profile", str(d), "--offload", "sequential", "--dtype", "bfloat16", "--device", "cpu"]
            prof += ["--max-samples", str(args.records), "--max-length", str(args.max_length), *common]
            profile, prof_s, prof_rss = run_dry(prof)
            rows.append((name, PUBLISHED[name], made, prune, prune_s, prune_rss, profile, prof_s, prof_rss))
            print(f"{name}: layout {made:.1f} s, prune dry run {prune_s:.1f} s, profile dry run {prof_s:.1f} s",
                  file=sys.stderr)  # fmt: skip
        offload_peak, offload_items = offload_check(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nprune --keep {args.keep} --dry-run, bandwidth {float(bandwidth) / 1e9:.2f} GB/s\n")
    print(
        "| model | source | kept | output | shards | read | written | peak memory | rewrite time | dry run: wall (planning), peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, pub, _made, p, ps, prss, *_ in rows:
        kept = "/".join(str(k) for k in p["kept"]) + f"/{p['num_experts']}"
        mtp = f" (MTP layer left out: {p['dropped_mtp']} tensors)" if p["dropped_mtp"] else ""
        print(
            f"| {name} | {gb(p['source_tensor_bytes'])} in {pub.shards} shards | {kept} x {p['layers']} layers{mtp} "
            f"| {gb(p['output_tensor_bytes'])} | {len(p['shards'])} | {gb(p['bytes_read'])} | {gb(p['bytes_written'])} "
            f"| {gb(p['peak_memory'])} | {minutes(p['seconds'])} | {ps:.1f} s ({p['plan_seconds']:.1f} s), {gb(prss)} |"
        )
    print(
        f"\nprofile --offload sequential --dtype bfloat16 --device cpu --dry-run, "
        f"{args.records} records x {args.max_length} tokens\n"
    )
    print(
        "| model | profile | read | peak memory | of which the largest layer | time to read | dry run: wall (planning), peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, _pub, _made, _p, _ps, _prss, q, qs, qrss in rows:
        layer = sum(
            n for label, n in q["memory"].items() if label.startswith(("decoder layer", "one expert"))
        )
        print(
            f"| {name} | {gb(q['profile_bytes'])} | {gb(q['bytes_read'])} | {gb(q['peak_memory'])} "
            f"| {gb(layer)} (layer {q['largest_layer']}) | {minutes(q['read_seconds'])} "
            f"| {qs:.1f} s ({q['plan_seconds']:.1f} s), {gb(qrss)} |"
        )
    for name, *_rest, q, _qs, _qrss in rows:
        print(f"\n{name}: profile --dry-run memory items")
        for label, n in q["memory"].items():
            print(f"  {gb(n):>10}  {label}")
    print(
        f"\ncheck: bench_offload.py's checkpoint estimated at {offload_peak / 1e6:.0f} MB peak; "
        f"measured {MEASURED_OFFLOAD_PEAK / 1e6:.0f} MB (ratio {offload_peak / MEASURED_OFFLOAD_PEAK:.2f})"
    )
    for label, n in offload_items:
        print(f"  {n / 1e6:>8.0f} MB  {label}")


if __name__ == "__main__":
    main()
