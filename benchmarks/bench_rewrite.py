"""Checkpoint rewrite: peak memory and speed of the streaming `remove` surgery.

Generates a random fused-layout DeepSeek-V3-style checkpoint (bf16, hidden 1024, 64 routed experts
in 8 groups, top-8, 12 MoE layers + 1 dense, about 2.6 GB in 5 shards) in a temporary folder,
writing it shard by shard straight from a small pool of random bytes (no model is built in memory).
Then it rewrites it keeping 32 of 64 experts per layer (4 per group) in a child process, and reports:

- peak RSS of the child as a fraction of the checkpoint size (goal < 10%), with the child's RSS
  after importing ``moeprune.surgery`` for scale (before issue 17 that imported torch, ~230 MB). The child reports its own
  high-water mark (``VmHWM`` in ``/proc/self/status``): on Linux
  ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` inherits the parent's high-water mark across fork +
  exec, so it would report this script's own memory;
- rewrite time / time to ``cp`` the same number of bytes (goal <= 1.2), for the whole
  ``rewrite_checkpoint`` call in a fresh process (importing ``moeprune.surgery`` excluded, done
  before the clock starts; anything the call imports itself, such as transformers, counted), for
  the import and the call together and for the whole process (interpreter start to exit: what a
  command pays; the trees are byte-compiled first, as an installed package is), and for its
  shard-writing phase alone, in wall time and in CPU time (user + system: what a
  loaded machine distorts least); the time before the first shard is the fixed cost (config,
  headers, key map, plan; before issue 17 also building the model on the meta device). ``cp``
  copies whole source shards adding up to about the kept bytes, and its times are scaled to
  exactly the kept bytes. Both read a source that is in the page cache (written and synced just
  before); neither syncs its output. With ``--repeat`` N, rewrites and ``cp`` alternate N times
  (the order of the checkouts flipping each round) and the medians are reported, with the largest
  peak RSS, and the fastest run of each (on a shared VM some runs of both take several times
  the CPU time of the others).

``--baseline SRC`` also runs the child with another checkout's ``src`` (e.g. a worktree of the
previous commit, ``git archive``) on the same checkpoint, alternating with this one (``--repeat`` times each), and
reports both: before/after figures of one run.

``--cli`` times the command instead of the call: ``moeprune prune SRC --plan PLAN --out OUT`` as a
whole process (interpreter start to exit, what a user waits for), with a plan file as
`moeprune plan` writes one (the checkpoint's fingerprint and router digest), its peak RSS (the
child's ``VmHWM``), CPU time and what it imported, against the same ``cp``.

Everything generated is deleted at the end (``--source`` reuses a checkpoint this script generated
and leaves it).

    python benchmarks/bench_rewrite.py [--layers 12] [--baseline ../main/src] [--cli] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _models import POOL, append_section, dsv3_config, dsv3_entries, kv_table, write_shards

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
if os.environ.get("BENCH_TORCH_FIRST"):  # --with-torch: does a loaded torch slow the same rewrite?
    import torch  # noqa: F401
i0, ic0 = time.perf_counter(), os.times()
import moeprune.surgery as surgery  # (and torch, before issue 17's torch-free rewrite)
torch_at_import = "torch" in sys.modules

def hwm_kb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

writes = []
write = surgery.write_safetensors

def timed(*args, **kwargs):
    t = time.perf_counter()
    out = write(*args, **kwargs)
    writes.append((t, time.perf_counter()))
    return out

surgery.write_safetensors = timed
base = hwm_kb()
src, out, kept = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t0, c0 = time.perf_counter(), os.times()
result = surgery.rewrite_checkpoint(src, out, {int(k): v for k, v in kept.items()})
seconds, c1 = time.perf_counter() - t0, os.times()
print(json.dumps({"seconds": seconds, "write_seconds": writes[-1][1] - writes[0][0],
                  "cpu_seconds": c1.user + c1.system - c0.user - c0.system,
                  "import_seconds": t0 - i0, "import_cpu_seconds": c0.user + c0.system - ic0.user - ic0.system,
                  "transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules,
                  "plan_seconds": writes[0][0] - t0, "tail_seconds": t0 + seconds - writes[-1][1],
                  "torch_at_import": torch_at_import,
                  "hwm_after_imports_kb": base, "hwm_peak_kb": hwm_kb(),
                  "bytes_out": result.bytes_out, "shards": len(result.shards)}))
"""

# --cli: the command itself, as the `moeprune` entry point runs it (moeprune.cli.main), reporting
# its own high-water mark and imports on stderr's last line (stdout is the command's)
CLI_CHILD = r"""
import json, sys
from moeprune.cli import main
rc = main(sys.argv[1:])
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"rc": rc, "hwm_peak_kb": hwm, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules, "numpy": "numpy" in sys.modules}),
      file=sys.stderr)
sys.exit(rc)
"""


def config(layers: int):
    return dsv3_config(layers, dtype="bfloat16")


def generate(directory: Path, layers: int, shards: int) -> int:
    """Write the checkpoint shard by shard; returns the bytes of tensor data."""
    import torch

    from moeprune.modelio import build_on_meta

    cfg = config(layers)
    cfg.save_pretrained(directory)
    meta = build_on_meta(cfg)
    entries = dsv3_entries(meta.state_dict())
    del meta
    pool = torch.randn(POOL // 2, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    return write_shards(directory, entries, shards, {"BF16": pool, "F32": pool})  # one pool for both dtypes


def kept_plan(layers: int, ragged: bool = False) -> dict[int, list[int]]:
    """Keep 4 of each group of 8 experts, different ones per layer; ``ragged``: 2, 3 or 4 of each
    group by layer (16, 24 or 32 experts: a ragged checkpoint, as a global-scope plan makes)."""
    per = {layer: (2 + layer % 3 if ragged else 4) for layer in range(1, layers + 1)}
    return {
        layer: sorted(g * 8 + (layer + 2 * j) % 8 for g in range(8) for j in range(per[layer]))
        for layer in range(1, layers + 1)
    }


def time_cp(src: Path, dst: Path, kept_bytes: int) -> tuple[float, float, int]:
    """Wall and CPU seconds (user + system) to cp whole shards adding up to about ``kept_bytes``,
    both scaled to exactly that, and the bytes copied."""
    shards = sorted(src.glob("model-*.safetensors"), key=lambda p: -p.stat().st_size)
    chosen, size = [], 0
    for p in shards:
        if size >= kept_bytes:
            break
        chosen.append(p)
        size += p.stat().st_size
    dst.mkdir()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", *map(str, chosen), str(dst)], check=True)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return seconds * kept_bytes / size, cpu * kept_bytes / size, size


def write_plan(src: Path, kept: dict[int, list[int]], path: Path) -> Path:
    """A plan file for ``kept`` as `moeprune plan` writes one: the checkpoint's config fingerprint
    and router digest (which `moeprune prune` checks), equal groups of the 8 routing groups."""
    from moeprune.arch import find_moe_blocks
    from moeprune.identity import checkpoint_router_digest, fingerprint_fields, model_fingerprint
    from moeprune.modelio import build_on_meta, load_config
    from moeprune.plan import Plan

    cfg = load_config(str(src))
    blocks = find_moe_blocks(build_on_meta(cfg))
    plan = Plan(
        model_fingerprint=model_fingerprint(fingerprint_fields(cfg, blocks)),
        model_type=cfg.model_type,
        layers=sorted(kept),
        num_experts=blocks[0].num_experts,
        top_k=blocks[0].top_k,
        method="frequency",
        kept=kept,
        settings={"n_group": blocks[0].spec.n_group},
        router_sha256=checkpoint_router_digest(src, cfg) or "",
    )
    path.write_text(plan.dumps())
    return path


def run_cli(src: Path, out: Path, plan: Path, tree: Path) -> dict:
    """`moeprune prune SRC --plan PLAN --out OUT` in a fresh process importing moeprune from ``tree``:
    wall and CPU seconds from interpreter start to exit, its peak RSS and imports."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CLI_CHILD, "prune", str(src), "--plan", str(plan), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU times add up per child; ru_maxrss does not
    if proc.returncode != 0:
        sys.exit(f"moeprune prune failed ({tree}):\n{proc.stdout}{proc.stderr}")
    child = json.loads(proc.stderr.strip().splitlines()[-1])
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return {**child, "process_seconds": seconds, "cpu_seconds": cpu}


def cli_report(runs: list[dict], on_disk: int, kept_bytes: int, cp: dict) -> str:
    """The --cli table of one checkout: medians over its runs, the largest peak RSS."""
    n = len(runs)
    wall = statistics.median(r["process_seconds"] for r in runs)
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    best = min(r["process_seconds"] for r in runs)
    peak = max(r["hwm_peak_kb"] for r in runs) * 1024
    imported = [m for m in ("torch", "transformers", "numpy") if any(r[m] for r in runs)]
    rows = [
        ("checkpoint -> kept bytes", f"{on_disk / 1e9:.2f} GB -> {kept_bytes / 1e9:.2f} GB"),
        (f"peak RSS of `moeprune prune` (largest of {n})", f"{peak / 1e6:.0f} MB = {100 * peak / on_disk:.1f}%"),
        ("imported", ", ".join(imported) or "neither torch nor transformers (nor numpy)"),
        (
            f"cp of the kept bytes (median of {n})",
            f"{cp['seconds']:.2f} s, CPU {cp['cpu_seconds']:.2f} s (fastest {cp['best_seconds']:.2f} s)",
        ),
        (
            f"`moeprune prune`, interpreter start to exit (median of {n})",
            f"{wall:.2f} s = {wall / cp['seconds']:.2f} x cp; CPU {cpu:.2f} s = {cpu / cp['cpu_seconds']:.2f} x cp",
        ),
        ("fastest run / fastest cp", f"{best:.2f} s = {best / cp['best_seconds']:.2f} x cp"),
        ("each run", ", ".join(f"{r['process_seconds']:.2f}" for r in runs) + " s"),
    ]
    return kv_table(rows)


def check_output(src: Path, out: Path, kept: dict[int, list[int]]) -> None:
    """One sliced tensor of the output equals the kept rows of the source (bytes compared)."""
    import torch

    from moeprune.checkpoint import Checkpoint

    a, b = Checkpoint.open(src), Checkpoint.open(out)
    layer = max(kept)
    for name in ("mlp.experts.down_proj", "mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
        key = f"model.layers.{layer}.{name}"
        assert torch.equal(b.tensor(key), a.experts(key, kept[layer])), key
    assert b.total_bytes < a.total_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="MoE layers (about 0.2 GB each)")
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="a checkpoint this script generated (same --layers): reused, kept",
    )
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's src to compare with")
    parser.add_argument(
        "--with-torch", action="store_true", help="also run this checkout with torch imported before the clock"
    )
    parser.add_argument(
        "--cli", action="store_true", help="time the whole `moeprune prune` command instead of the call"
    )
    parser.add_argument(
        "--ragged",
        action="store_true",
        help="keep 16, 24 or 32 experts by layer: a ragged checkpoint (moeprune's config and remote code)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rewrites per checkout, alternating")
    parser.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    args = parser.parse_args()
    if args.cli and args.with_torch:  # the command has no way to import torch first
        parser.error("--with-torch times the call; it does not apply with --cli")

    work = Path(tempfile.mkdtemp(prefix="moeprune-bench-rewrite-", dir=args.dir))
    load = [os.getloadavg()[0]]
    try:
        src, out = args.source or work / "src", work / "out"
        if args.source is None:
            src.mkdir()
            t0 = time.perf_counter()
            total = generate(src, args.layers, args.shards)
            print(f"generated {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        on_disk = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        kept = kept_plan(args.layers, args.ragged)
        plan = write_plan(src, kept, work / "plan.json") if args.cli else None
        subprocess.run(["sync"], check=False)

        trees = [("this checkout", ROOT / "src")]
        if args.with_torch:
            trees.append(("this checkout, torch imported first", ROOT / "src"))
        if args.baseline is not None:
            trees.insert(0, ("baseline", args.baseline.resolve()))
        for _, tree in trees:  # as an installed package has it: else (PYTHONDONTWRITEBYTECODE) every
            # child compiles each module it imports, ~0.1 s that no user pays
            compileall.compile_dir(str(tree), quiet=1)
        runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
        cps: list[tuple[float, float, int]] = []
        for r in range(args.repeat):  # alternating: rewrite(s), then cp of the kept bytes; order flips
            for name, tree in trees if r % 2 == 0 else trees[::-1]:
                shutil.rmtree(out, ignore_errors=True)
                if plan is not None:
                    runs[name].append(run_cli(src, out, plan, tree))
                else:
                    runs[name].append(run_child(src, out, kept, tree, torch_first="torch" in name))
                check_output(src, out, kept)
                subprocess.run(["sync"], check=False)
            kept_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            shutil.rmtree(work / "cp", ignore_errors=True)
            cps.append(time_cp(src, work / "cp", kept_bytes))
            subprocess.run(["sync"], check=False)
            each = ", ".join(
                f"{name} {runs[name][-1]['process_seconds']:.2f} s"
                if plan is not None
                else f"{name} {runs[name][-1]['seconds']:.2f} s (writing {runs[name][-1]['write_seconds']:.2f})"
                for name, _ in trees
            )
            print(f"round {r + 1}: {each}, cp {cps[-1][0]:.2f} s; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        load.append(os.getloadavg()[0])
        cp = {
            "seconds": statistics.median(c[0] for c in cps),
            "cpu_seconds": statistics.median(c[1] for c in cps),
            "best_seconds": min(c[0] for c in cps),
            "bytes": cps[0][2],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tables = [
        (
            name,
            cli_report(runs[name], on_disk, kept_bytes, cp)
            if args.cli
            else report(_median(runs[name]), args, on_disk, kept_bytes, cp, len(runs[name])),
        )
        for name, _ in trees
    ]
    text = "\n\n".join(f"{name}:\n\n{table}" if len(tables) > 1 else table for name, table in tables)
    text += f"\n\n`uptime` load {load[0]:.1f} at the start, {load[1]:.1f} at the end."
    print(text)
    if args.append is not None:
        base = " --baseline BASE/src" if args.baseline is not None else ""
        base += " --with-torch" if args.with_torch else ""
        base += " --cli" if args.cli else ""
        base += " --ragged" if args.ragged else ""
        cmd = f"python benchmarks/bench_rewrite.py --layers {args.layers} --repeat {args.repeat}{base} --append docs/benchmarks.md"
        append_section(
            args.append,
            "Checkpoint rewrite",
            cmd,
            "source in the page cache, no sync",
            "Goals: peak RSS < 10% of the checkpoint, rewrite / cp <= 1.2.",
            text,
        )


def _median(children: list[dict]) -> dict:
    """Median of every timing over the runs of one checkout; the largest peak RSS."""
    out = dict(children[0])
    for key in (
        "seconds",
        "write_seconds",
        "plan_seconds",
        "tail_seconds",
        "cpu_seconds",
        "import_seconds",
        "import_cpu_seconds",
        "process_seconds",
        "hwm_after_imports_kb",
    ):
        out[key] = statistics.median(c[key] for c in children)
    out["hwm_peak_kb"] = max(c["hwm_peak_kb"] for c in children)
    # the fastest run: on this shared VM some runs of both the rewrite and cp take 2-5 x the CPU
    # time of the others (contention outside the process), so medians of few runs swing
    out["best_seconds"] = min(c["seconds"] for c in children)
    out["best_process_seconds"] = min(c["process_seconds"] for c in children)
    out["best_with_import_seconds"] = min(c["seconds"] + c["import_seconds"] for c in children)
    return out


def run_child(src: Path, out: Path, kept: dict[int, list[int]], tree: Path, torch_first: bool = False) -> dict:
    """One rewrite in a fresh process importing moeprune from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "BENCH_TORCH_FIRST": "1" if torch_first else ""}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out), json.dumps(kept)],
        capture_output=True,
        text=True,
        env=env,
    )
    process_seconds = time.perf_counter() - t0  # interpreter start to exit: what a command pays
    if proc.returncode != 0:
        sys.exit(f"rewrite failed ({tree}):\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_seconds": process_seconds}


def report(child: dict, args, on_disk: int, kept_bytes: int, cp: dict, n: int) -> str:
    peak = child["hwm_peak_kb"] * 1024
    base = child["hwm_after_imports_kb"] * 1024
    total_s, write_s, cpu_s = child["seconds"], child["write_seconds"], child["cpu_seconds"]
    cp_s, cp_cpu = cp["seconds"], cp["cpu_seconds"]
    imp_s, imp_cpu = total_s + child["import_seconds"], cpu_s + child["import_cpu_seconds"]
    rows = [
        (f"checkpoint (bf16, {args.shards} shards)", f"{on_disk / 1e9:.2f} GB"),
        (
            "rewritten, keeping " + ("16-32/64 experts (ragged)" if args.ragged else "32/64 experts"),
            f"{kept_bytes / 1e9:.2f} GB in {child['shards']} shard(s)",
        ),
        (
            f"peak RSS of the rewrite process (largest of {n})",
            f"{peak / 1e6:.0f} MB = {100 * peak / on_disk:.1f}% of the checkpoint",
        ),
        (
            "  of which after importing moeprune.surgery"
            + (" (and torch with it)" if child.get("torch_at_import") else " (no torch)"),
            f"{base / 1e6:.0f} MB",
        ),
        ("  added by the rewrite", f"{(peak - base) / 1e6:.0f} MB = {100 * (peak - base) / on_disk:.1f}%"),
        (
            "  imported by the end of the call",
            ", ".join(m for m in ("torch", "transformers") if child.get(m)) or "neither torch nor transformers",
        ),
        (
            f"cp of the kept bytes (median of {n})",
            f"{cp_s:.2f} s, CPU {cp_cpu:.2f} s (scaled from cp of {cp['bytes'] / 1e9:.2f} GB)",
        ),
        (
            f"rewrite, whole call (fresh process, median of {n})",
            f"{total_s:.2f} s = {total_s / cp_s:.2f} x cp; CPU {cpu_s:.2f} s = {cpu_s / cp_cpu:.2f} x cp",
        ),
        (
            "importing moeprune.surgery first (a command pays it)",
            f"{child['import_seconds']:.2f} s, CPU {child['import_cpu_seconds']:.2f} s; with the call "
            f"{imp_s:.2f} s = {imp_s / cp_s:.2f} x cp, CPU {imp_cpu:.2f} s = {imp_cpu / cp_cpu:.2f} x cp",
        ),
        (
            "the whole process (interpreter start to exit)",
            f"{child['process_seconds']:.2f} s = {child['process_seconds'] / cp_s:.2f} x cp",
        ),
        (
            f"best of {n}: cp / call / import + call / whole process",
            f"{cp['best_seconds']:.2f} s / {child['best_seconds'] / cp['best_seconds']:.2f} / "
            f"{child['best_with_import_seconds'] / cp['best_seconds']:.2f} / "
            f"{child['best_process_seconds'] / cp['best_seconds']:.2f} x cp",
        ),
        ("rewrite, writing the shards", f"{write_s:.2f} s = {write_s / cp_s:.2f} x cp"),
        ("rewrite before writing (config, keys, plan)", f"{child['plan_seconds']:.2f} s"),
        ("rewrite after the last shard (config, index, card, rename)", f"{child['tail_seconds']:.2f} s"),
    ]
    return kv_table(rows)


if __name__ == "__main__":
    main()
