"""Least-squares novices against MoNE's mean novices on the testbed (issue 15 #3).

Per exact-match domain, as bench_smallest.py: the profile is made on the first ``--demos``
calibration records (answers self-generated), the test set is the first ``--limit`` records of the
domain's eval file. For each method and each size (25% and 12.5% of the experts per layer, novice
mode, layer scope, the router whole) the same kept sets are evaluated with ``--novice mean`` and
``--novice lsq``. Also recorded: how much lsq lowers the calibration objective (Σ over replaced
experts of Σ_t g² ‖e − n‖², the novices' squared error on the block output), from the profile alone.

    python benchmarks/bench_novice_fit.py --limit 30 --method mone --method easyep
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_smallest import stderr_ratio  # noqa: E402

FITS = ("mean", "lsq")
FRACTIONS = (0.25, 0.125)


def run_domain(lm: Any, tok: Any, model: str, task: str, args: Any, out: Path) -> dict[str, Any]:
    from moeprune.evaluate.tasks import EXACT_MATCH, Task
    from moeprune.profile import Profile
    from moeprune.profiling import run_profile
    from moeprune.score import score
    from moeprune.search import make_variant, relative_quality
    from moeprune.search_run import variant_evaluator
    from moeprune.testbed import DATA_DIR

    calib = (DATA_DIR / f"{task}.calib.jsonl").read_text().splitlines()
    demos = out / f"{task}.train.jsonl"
    demos.write_text("\n".join(calib[: args.demos]) + "\n")
    prof_path = out / f"{task}.profile.safetensors"
    if not prof_path.exists():
        run_profile(model=model, data=[str(demos)], out=prof_path, self_generate=24, quiet=True,
                    loaded=(lm, tok), force=True)  # fmt: skip
    prof = Profile.load(prof_path)
    records = [json.loads(x) for x in (DATA_DIR / f"{task}.eval.jsonl").read_text().splitlines()]
    test = Task("test", EXACT_MATCH, records[: args.limit])
    n = len(test.records)
    runs = {fit: variant_evaluator(lm, tok, prof, [test], novice_fit=fit, max_new_tokens=24) for fit in FITS}
    full = runs["mean"](None)
    full_acc = float(full["test"]["accuracy"])
    meta, n_exp = prof.meta, int(prof.meta["num_experts"])
    rows: dict[str, Any] = {}
    for method in args.method:
        scores = score(prof, method)
        for frac in FRACTIONS:
            k = round(frac * n_exp)
            plan = make_variant(scores, meta, method, "novice", "layer", k)
            row: dict[str, Any] = {"k": k}
            for fit in FITS:
                q = relative_quality(full, runs[fit](plan, "novice"), {"test": EXACT_MATCH})
                row[fit] = (q, stderr_ratio(q * full_acc, n, full_acc))
            row["objective_gain"] = objective_gain(prof, plan)
            rows[f"{method} {frac}"] = row
            print(f"[{task}] {method} {frac}: {row}", file=sys.stderr, flush=True)
    return {"full_acc": full_acc, "n_test": n, "rows": rows}


def objective_gain(prof: Any, plan: Any) -> float:
    """By how much the lsq novices lower Σ_replaced Σ_t g² ‖e − n‖² below the mean novices: since n
    is the g²-weighted mean, Σ g² ‖e − ē‖² − Σ g² ‖e − n‖² = (Σ g²) ‖n − ē‖², which the profile
    holds (the objectives themselves need Σ g² ‖e‖², which it does not)."""
    gain = 0.0
    for row, layer in enumerate(plan.layers):
        ids = plan.replaced[layer]
        d = prof["novice_lsq"][row, ids].double() - prof["mone_mean"][row, ids].double()
        gain += float((prof["gate_sq"][row, ids] * d.square().sum(-1)).sum())
    return gain


def main() -> int:
    from moeprune.modelio import load_model
    from moeprune.testbed import TASKS, testbed_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/novice_fit"))
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--demos", type=int, default=25)
    ap.add_argument("--method", action="append")
    ap.add_argument("--task", action="append")
    args = ap.parse_args()
    args.method = args.method or ["mone"]
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(testbed_path())
    lm, tok = load_model(model, dtype="float32", device="cpu")
    results = {}
    started = time.perf_counter()
    for task in args.task or TASKS:
        results[task] = run_domain(lm, tok, model, task, args, args.out)
        (args.out / "novice_fit.json").write_text(json.dumps(results, indent=1))
    lines = ["| domain | method | kept per layer | mean novices | lsq novices |", "|---|---|---|---|---|"]
    for task, res in results.items():
        for name, row in res["rows"].items():
            method = name.split()[0]
            cell = {f: f"{row[f][0]:.0%} ± {row[f][1]:.0%}" for f in FITS}
            lines.append(f"| {task} | {method} | {row['k']}/32 | {cell['mean']} | {cell['lsq']} |")
    print(f"({(time.perf_counter() - started) / 60:.0f} min)\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
