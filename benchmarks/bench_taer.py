"""Task-adaptive expert retrieval (PreMoe TAER): routing accuracy, memory and switching cost.

1. Routing accuracy on the testbed: a library with one task per testbed domain, each profiled on
   its calibration file (`moeprune library build`, keep 50%); the queries are the held-out eval
   records (task prompts; for the text domains the first 256 characters of each record). Keys
   ``records`` (nearest calibration record; the adaptive model's default) and ``first`` (PreMoe's
   per-task key), both from a forward up to the first MoE router, and ``all`` (every MoE layer;
   full model). Coverage = share of the query's own (token, expert) choices that the chosen
   pattern keeps (at the first MoE layer, or at every MoE layer for ``all``).
2. Memory and switching on a random DeepSeek-V3-style checkpoint (bf16, hub layout: one key per
   expert, 64 routed experts in 8 groups, 16 MoE layers, about 3.4 GB, written to a temporary
   folder): in separate child processes, the peak RSS of loading the full model with stock
   ``from_pretrained`` and of ``AdaptiveMoE.from_library`` + activating one task, at K = 16 and
   32 experts per layer, against the ideal (non-expert weights + K experts per layer); then, in
   the adaptive child, the time and bytes of a switch to a second task that shares half of the
   first task's experts, against the time to load the full model (median of alternating runs,
   files in the page cache for both). Everything generated is deleted at the end.

    python benchmarks/bench_taer.py [--layers 16] [--skip-routing] [--skip-memory] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _models import append_section, kv_table, write_random_dsv3

TEXT_QUERY_CHARS = 256

CHILD = r"""
import json, sys, time
import torch, transformers  # noqa: F401  (their memory is the baseline)
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM  # noqa: F401
from moeprune.adaptive import AdaptiveMoE

def hwm(field="VmHWM"):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

torch.set_num_threads(int(sys.argv[4]))
what, src, lib = sys.argv[1], sys.argv[2], sys.argv[3]
base = hwm()
out = {"base": base}
if what == "full":
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    out["load_s"] = time.perf_counter() - t0
    out["rss_loaded"] = hwm("VmRSS")
    out["held"] = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
else:
    t0 = time.perf_counter()
    am = AdaptiveMoE.from_library(src, lib, dtype="bfloat16")
    out["build_s"] = time.perf_counter() - t0
    sw = am.activate("a")
    out["first"] = {"s": sw.seconds, "bytes": sw.bytes_read, "read": sw.read_experts}
    out["peak_one_task"] = hwm()
    out["rss_one_task"] = hwm("VmRSS")
    out["held"] = sum(t.numel() * t.element_size() for t in [*am.model.parameters(), *am.model.buffers()])
    out["ideal"] = am.non_expert_bytes() + am.expert_bytes()
    out["non_expert"] = am.non_expert_bytes()
    switches = []
    for name in ["b", "a"] * int(sys.argv[5]):
        sw = am.activate(name)
        switches.append({"s": sw.seconds, "bytes": sw.bytes_read, "read": sw.read_experts, "reused": sw.reused_experts})
    out["switches"] = switches
    out["rss_after_switches"] = hwm("VmRSS")
    ids = torch.randint(3, 32000, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(am.model(ids).logits.float()).all()
out["peak"] = hwm()
print(json.dumps(out))
"""


# --- 1. routing accuracy on the testbed ----------------------------------------------------------


def routing(tmp: Path, keep: str) -> tuple[list[tuple[str, str]], dict]:
    from moeprune.cli import main as cli
    from moeprune.testbed import DOMAINS, MODEL_DIR, TASKS, data_file

    lib = tmp / "testbed-lib"
    args = ["library", "build", str(MODEL_DIR), "--keep", keep, "--out", str(lib), "-q"]
    for d in DOMAINS:
        args += ["--task", f"{d}={data_file(d, 'calib')}"]
    if cli(args) != 0:
        sys.exit("library build failed")
    queries = tmp / "queries.jsonl"
    with queries.open("w") as fh:
        for d in DOMAINS:
            for line in data_file(d, "eval").read_text().splitlines():
                rec = json.loads(line)
                text = rec["prompt"] if d in TASKS else rec["text"][:TEXT_QUERY_CHARS]
                fh.write(json.dumps({"prompt": text, "task": d}) + "\n")
    results = {}
    for key in ("records", "first", "all"):
        out = tmp / f"routes-{key}.json"
        if cli(["library", "route", str(lib), "--file", str(queries), "--key", key, "-o", str(out)]) != 0:
            sys.exit("library route failed")
        results[key] = json.loads(out.read_text())
    rows = []
    for key, data in results.items():
        per: dict[str, list] = {}
        for r in data["results"]:
            per.setdefault(r["label"], []).append(r)
        cells = ", ".join(f"{d} {sum(x['correct'] for x in rs) / len(rs):.1%}" for d, rs in per.items())
        cov = sum(r["mean_coverage"] for r in data["results"]) / len(data["results"])
        rows.append(
            (
                f"routing accuracy, key `{key}` ({len(data['results'])} held-out queries)",
                f"**{data['accuracy']:.1%}** ({cells}); coverage {cov:.0%}",
            )
        )
    return rows, results


# --- 2. memory and switching ---------------------------------------------------------------------


def random_library(src: Path, out: Path, keep: int) -> float:
    """Two tasks on the random checkpoint: a = random K per layer (equal per group), b = half of a's
    experts and K/2 others. Returns the share of experts b shares with a."""
    import torch

    from moeprune.arch import find_moe_blocks
    from moeprune.library import Library, TaskPattern
    from moeprune.modelio import build_on_meta, load_config
    from moeprune.plan import Plan
    from moeprune.profile import fingerprint_fields, model_fingerprint

    config = load_config(str(src))
    blocks = find_moe_blocks(build_on_meta(config))
    e, groups = blocks[0].num_experts, blocks[0].spec.n_group
    size, per = e // groups, keep // groups
    fields = fingerprint_fields(config, blocks)
    fp = model_fingerprint(fields)
    g = torch.Generator().manual_seed(0)
    kept_a, kept_b = {}, {}
    for b in blocks:
        a_ids, b_ids = [], []
        for grp in range(groups):
            perm = (torch.randperm(size, generator=g) + grp * size).tolist()
            a_ids += perm[:per]
            b_ids += perm[: per // 2] + perm[per : per + per - per // 2]
        kept_a[b.layer], kept_b[b.layer] = sorted(a_ids), sorted(b_ids)
    layers = [b.layer for b in blocks]
    tasks = {}
    for name, kept in (("a", kept_a), ("b", kept_b)):
        plan = Plan(fp, "deepseek_v3", layers, e, blocks[0].top_k, "random", kept)
        key = {"first": torch.rand(e, generator=g, dtype=torch.float64)}
        key["all"] = torch.rand(e * len(layers), generator=g, dtype=torch.float64)
        tasks[name] = TaskPattern(name, plan, torch.zeros(len(layers), e, dtype=torch.float64), key)
    Library(str(src), fields, fp, "random", keep, blocks[0].top_k, layers, e, tasks).save(out)
    shared = sum(len(set(kept_a[la]) & set(kept_b[la])) for la in layers)
    return shared / (keep * len(layers))


def child(what: str, src: Path, lib: Path, threads: int, repeats: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, what, str(src), str(lib), str(threads), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def memory(tmp: Path, layers: int, keeps: list[int], threads: int, repeats: int) -> list[tuple[str, str]]:
    src = tmp / "src"
    src.mkdir()
    total = write_random_dsv3(src, layers, 8)
    subprocess.run(["cat", *map(str, src.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=False)
    rows = [
        (
            f"checkpoint (bf16, hub layout, 8 shards, {layers} MoE layers of 64 experts)",
            f"{total / 1e9:.2f} GB",
        )
    ]
    fulls = [child("full", src, src, threads, 0) for _ in range(repeats)]
    full_peak = median([f["peak"] - f["base"] for f in fulls])
    full_rss = median([f["rss_loaded"] - f["base"] for f in fulls])
    full_load = median([f["load_s"] for f in fulls])
    rows.append(
        (
            "full model, stock `from_pretrained` (bf16)",
            f"peak RSS above imports {full_peak / 1e9:.2f} GB, {full_rss / 1e9:.2f} GB once loaded "
            f"(holds {fulls[0]['held'] / 1e9:.2f} GB); "
            f"load {full_load:.2f} s (median of {repeats})",
        )
    )
    for keep in keeps:
        lib = tmp / f"lib-{keep}"
        share = random_library(src, lib, keep)
        runs = [child("adaptive", src, lib, threads, 2) for _ in range(repeats)]
        r = runs[0]
        peak = median([x["peak"] - x["base"] for x in runs])
        rss = median([x["rss_after_switches"] - x["base"] for x in runs])
        ideal = r["ideal"]
        switch_s = median([s["s"] for x in runs for s in x["switches"]])
        switch_b = r["switches"][0]["bytes"]
        build = median([x["build_s"] for x in runs])
        first = median([x["first"]["s"] for x in runs])
        rows += [
            (
                f"adaptive, K = {keep}/64: peak RSS above imports",
                f"**{peak / 1e9:.2f} GB = {peak / ideal:.2f} x the ideal** ({ideal / 1e9:.2f} GB = non-expert "
                f"{r['non_expert'] / 1e9:.2f} GB + {keep} experts/layer) = {peak / full_peak:.2f} x the full model",
            ),
            (
                f"adaptive, K = {keep}: RSS above imports after switching back and forth",
                f"{rss / 1e9:.2f} GB = {rss / ideal:.2f} x the ideal",
            ),
            (
                f"adaptive, K = {keep}: start (non-expert weights) + first task",
                f"{build:.2f} s + {first:.2f} s ({r['first']['bytes'] / 1e9:.2f} GB of experts read)",
            ),
            (
                f"adaptive, K = {keep}: switch to a task sharing {share:.0%} of the experts",
                f"**{switch_s:.3f} s = {switch_s / full_load:.3f} x loading the full model**; "
                f"{switch_b / 1e6:.0f} MB read ({r['switches'][0]['read']} experts read, "
                f"{r['switches'][0]['reused']} reused) = {switch_b / total:.1%} of the checkpoint",
            ),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", type=int, action="append", help="K for the memory part (default 16 and 32)")
    parser.add_argument("--routing-keep", default="16", help="experts kept per layer in the testbed library")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-routing", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--append", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="moeprune-bench-taer-", dir=args.dir))
    try:
        if not args.skip_routing:
            rows += routing(work, args.routing_keep)[0]
        if not args.skip_memory:
            rows += memory(work, args.layers, args.keep or [16, 32], args.threads, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = kv_table(rows)
    print(table)
    if args.append is not None:
        append_section(
            args.append,
            "Task-adaptive expert retrieval (library, adaptive model)",
            "python benchmarks/bench_taer.py --append docs/benchmarks.md",
            "checkpoint in the page cache",
            "Goals: routing accuracy >= 95% to the right task; adaptive peak RSS near the ideal "
            "(non-expert weights + K experts per layer); a switch much cheaper than loading the model.",
            table,
        )


if __name__ == "__main__":
    main()
