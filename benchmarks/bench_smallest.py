"""`bench_quality.py --smallest`: per testbed domain, the smallest experts kept at which each method
(and `moeprune search`) keeps >= 99% and >= 95% of the full model on a test set disjoint from the
dev set, with standard errors, and every method's test quality at 25% and 12.5% of the experts.

Per exact-match domain: the profile is made on the first ``--demos`` calibration records (answers
self-generated, as bench_quality), the dev set is the next ``--dev`` calibration records (the
search sees only these), the test set is the first ``--limit`` records of the domain's eval file.
Fixed methods: bisection on K against the test set itself (the best each method can do at that
size: an upper bound no dev-set search can beat). `search`: `moeprune search`'s algorithm on the dev
set, its pick then measured on the test set, beside the best fixed method at the same K.
One model in memory; every (mode, kept sets) evaluated once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("mone", "easyep", "reap", "premoe")
MODES = ("novice", "remove")
TARGETS = (0.99, 0.95)


def stderr_ratio(acc: float, n: int, full: float) -> float:
    """Standard error of acc / full (the full model's accuracy taken as exact: it is 1.0 here)."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / n) / full if full > 0 else float("nan")


def run_domain(lm: Any, tok: Any, model: str, task: str, args: Any, out: Path) -> dict[str, Any]:
    from moeprune.evaluate.tasks import EXACT_MATCH, Task
    from moeprune.modelio import load_config
    from moeprune.profile import Profile
    from moeprune.profiling import run_profile
    from moeprune.score import score
    from moeprune.search import make_variant, relative_quality, search_plans, sizes_of
    from moeprune.search_run import variant_evaluator
    from moeprune.testbed import DATA_DIR

    calib = (DATA_DIR / f"{task}.calib.jsonl").read_text().splitlines()
    train, dev_lines = calib[: args.demos], calib[args.demos : args.demos + args.dev]
    demos = out / f"{task}.train.jsonl"
    demos.write_text("\n".join(train) + "\n")
    prof_path = out / f"{task}.profile.safetensors"
    run_profile(model=model, data=[str(demos)], out=prof_path, self_generate=24, quiet=True,
                loaded=(lm, tok), force=True)  # fmt: skip
    prof = Profile.load(prof_path)
    dev = Task("dev", EXACT_MATCH, [json.loads(x) for x in dev_lines])
    test_records = [json.loads(x) for x in (DATA_DIR / f"{task}.eval.jsonl").read_text().splitlines()]
    test = Task("test", EXACT_MATCH, test_records[: args.limit])
    n_test = len(test.records)
    memo: dict[tuple[str, str, Any], dict[str, Any]] = {}

    def cached(name: str, tasks: list[Any]):
        run = variant_evaluator(lm, tok, prof, tasks, max_new_tokens=24)

        def go(plan: Any, mode: str = "remove") -> dict[str, Any]:
            sig = (name, mode, None if plan is None else tuple(tuple(plan.kept[x]) for x in plan.layers))
            if sig not in memo:
                memo[sig] = run(plan, mode)
            return memo[sig]

        return go

    on_dev, on_test = cached("dev", [dev]), cached("test", [test])
    full_test = on_test(None)
    full_acc = float(full_test["test"]["accuracy"])
    kinds = {"test": EXACT_MATCH}
    meta = prof.meta
    n_exp = int(meta["num_experts"])
    rows: dict[str, dict[str, Any]] = {}

    def test_q(plan: Any, mode: str) -> float:
        return relative_quality(full_test, on_test(plan, mode), kinds)

    methods = args.method or list(METHODS)
    targets = sorted(float(t) for t in (args.target or TARGETS))
    for method in methods:
        scores = score(prof, method)
        for mode in MODES:
            # K up to half the experts: there every output-aware method keeps 100% of the testbed's
            # domains (bench_quality); a method that needs more is reported as "> half"
            feasible = [
                (k, p) for k in range(1, n_exp // 2 + 1) if (p := make_variant(scores, meta, method, mode, "layer", k))
            ]
            row: dict[str, Any] = {}
            start = 0
            for tgt in targets if args.bisect else []:  # bisection on the test set: smallest K that keeps tgt
                lo, hi, found = start, len(feasible), None
                while lo < hi:
                    mid = (lo + hi) // 2
                    if test_q(feasible[mid][1], mode) >= tgt:
                        hi, found = mid, feasible[mid][0]
                    else:
                        lo = mid + 1
                row[f"k{tgt}"] = found
                start = lo  # a higher target needs at least this K (assumed monotone)
            for frac in (0.25, 0.125):
                k = round(frac * n_exp)
                plan = dict(feasible).get(k)
                if plan is None:
                    row[f"q{frac}"] = None
                    continue
                q = test_q(plan, mode)
                row[f"q{frac}"] = (q, stderr_ratio(q * full_acc, n_test, full_acc))
            rows[f"{method} {mode}"] = row
            print(f"[{task}] {method} {mode}: {row}", file=sys.stderr, flush=True)

    full_dev = on_dev(None)
    sizes = sizes_of(load_config(model), prof)
    picks = {}
    for tgt in targets:
        res = search_plans(on_dev, full_dev, {"dev": EXACT_MATCH}, prof, sizes, target=tgt, methods=methods,
                           select=args.select)  # fmt: skip
        if res.best is None:
            picks[tgt] = None
            continue
        b = res.best
        q = test_q(res.plan, b.mode)
        # the best fixed method (layer scope, either mode) at the same K, measured on the test set
        best_fixed = max(
            (test_q(p, mode), f"{m} {mode}")
            for m in methods
            for mode in MODES
            if (p := make_variant(score(prof, m), meta, m, mode, "layer", b.experts)) is not None
        )
        picks[tgt] = {
            "pick": b.label(),
            "experts": b.experts,
            "kept_total": b.kept_total,
            "dev": b.quality,
            "dev_bound": b.bound,
            "test": (q, stderr_ratio(q * full_acc, n_test, full_acc)),
            "best_fixed_same_k": best_fixed,
            "evaluated": len(res.points),
        }
        print(f"[{task}] search {tgt}: {picks[tgt]}", file=sys.stderr, flush=True)
    return {"full_acc": full_acc, "n_test": n_test, "n_dev": len(dev.records), "rows": rows, "search": picks,
            "select": args.select,
            "num_experts": n_exp, "num_layers": len(meta["layers"])}  # fmt: skip


def fmt_q(v: Any) -> str:
    if v is None:
        return "-"
    q, se = v
    return f"{q:.0%} ± {se:.0%}"


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| domain | method | mode | smallest K >= 99% | smallest K >= 95% | test @ 25% (8/32) | test @ 12.5% (4/32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        n = r["num_experts"]
        for name, row in r["rows"].items():
            method, mode = name.split()
            ks = [
                "-" if f"k{t}" not in row else f"{row[f'k{t}']}/{n}" if row[f"k{t}"] else f"> {n // 2}/{n}"
                for t in TARGETS
            ]
            lines.append(f"| {task} | {method} | {mode} | {ks[0]} | {ks[1]} | {fmt_q(row['q0.25'])} | {fmt_q(row['q0.125'])} |")
        for key, p in r["search"].items():
            tgt = float(key)  # a str key once read back from JSON
            if p is None:
                lines.append(f"| {task} | **search** (dev {tgt:g}) | - | none | | | |")
                continue
            bq, bname = p["best_fixed_same_k"]
            bound = "" if p.get("dev_bound") is None else f" (bound {p['dev_bound']:.0%})"
            lines.append(
                f"| {task} | **search** (dev >= {tgt:g}) | {p['pick']} | {p['kept_total']}/{n * r['num_layers']} in all | "
                f"dev {p['dev']:.0%}{bound} | test {fmt_q(p['test'])} | best fixed at K={p['experts']}: {bname} {bq:.0%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from moeprune.modelio import load_model
    from moeprune.testbed import TASKS, testbed_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/smallest"))
    ap.add_argument("--limit", type=int, default=50, help="test records per domain")
    ap.add_argument("--demos", type=int, default=25, help="calibration records profiled")
    ap.add_argument("--dev", type=int, default=25, help="calibration records held out as the dev set")
    ap.add_argument("--task", action="append", help="domains (default: every exact-match task)")
    ap.add_argument("--append", type=Path)
    ap.add_argument("--method", action="append", help="methods (default: mone easyep reap premoe)")
    ap.add_argument("--target", action="append", help="targets (default 0.99 0.95)")
    ap.add_argument("--select", choices=("bound", "mean"), default="bound",
                    help="search's rule: the dev accuracy's 95%% lower bound passes the target (default), or the mean")  # fmt: skip
    ap.add_argument("--no-bisect", dest="bisect", action="store_false",
                    help="only the test quality at 25%% and 12.5%%, not the smallest K per method")  # fmt: skip
    ap.add_argument("--from-json", type=Path, action="append",
                    help="only print the table of earlier runs' smallest.json (one per domain run apart)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.from_json:
        merged: dict[str, Any] = {}
        for path in args.from_json:
            merged.update(json.loads(path.read_text()))
        print(table(merged))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(testbed_path())
    lm, tok = load_model(model, dtype="float32", device="cpu")
    results = {}
    started = time.perf_counter()
    for task in args.task or TASKS:
        results[task] = run_domain(lm, tok, model, task, args, args.out)
        (args.out / "smallest.json").write_text(json.dumps(results, indent=1, default=str))
    took = time.perf_counter() - started
    text = (
        "## Smallest model per domain (`--smallest`)\n\n"
        f"Command: `python benchmarks/bench_quality.py --smallest {' '.join(sys.argv[1:])}` "
        f"({took / 60:.0f} min on the shared CPUs)\n\n" + table(results)
    )
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
