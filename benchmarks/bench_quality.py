"""Quality benchmark on the testbed: every method x keep ratio, per exact-match task as the domain.

For each exact-match task of the testbed: profile 25 demonstrations of it (the model answering
them itself, EASY-EP style), then `moeprune compare` every method x ratio with routing masks (and
MoNE novices), evaluated on every task (the domain's own and the others) and the perplexity of
the text domains; the full model is the first row. Results go to OUT/<task>/results.md and, with
--append, into docs/benchmarks.md.

    python benchmarks/bench_quality.py --limit 100 --out runs/quality --append docs/benchmarks.md

With ``--smallest`` it runs benchmarks/bench_smallest.py instead: per domain, the smallest experts
kept at which each method and `moeprune search` keep >= 99% / >= 95% of the full model on a test set
disjoint from the dev set.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from moeprune.testbed import DATA_DIR, TASKS, TEXT_DOMAINS, testbed_path


def run(*args: str) -> None:
    print("+", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(args, check=True)


def main() -> int:
    if "--smallest" in sys.argv[1:]:  # the smallest-model benchmark (bench_smallest.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_smallest import main as smallest

        return smallest([a for a in sys.argv[1:] if a != "--smallest"])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--limit", type=int, default=100, help="records per evaluation task")
    ap.add_argument("--demos", type=int, default=25)
    ap.add_argument("--method", action="append", help="default: all methods")
    ap.add_argument("--keep", action="append", help="default: 0.75 0.5 0.25 0.125")
    ap.add_argument("--no-novice", action="store_true")
    ap.add_argument("--task", action="append", help="domains to benchmark (default: every exact-match task)")
    ap.add_argument("--append", type=Path, help="append the tables to this markdown file")
    args = ap.parse_args()

    model = str(testbed_path())
    args.out.mkdir(parents=True, exist_ok=True)
    eval_tasks = [f"testbed:{t}" for t in (*TASKS, *TEXT_DOMAINS)]
    sections = []
    for task in args.task or TASKS:
        demos = args.out / f"{task}.demos.in.jsonl"
        lines = (DATA_DIR / f"{task}.calib.jsonl").read_text().splitlines()[: args.demos]
        demos.write_text("\n".join(lines) + "\n")
        profile = args.out / f"{task}.profile.safetensors"
        started = time.perf_counter()
        run(
            "moeprune",
            "profile",
            model,
            "--data",
            str(demos),
            "--self-generate",
            "24",
            "--out",
            str(profile),
            "--force",  # a profile of an earlier run is replaced
            "-q",
        )
        cmd = ["moeprune", "compare", model, "--profile", str(profile), "--limit", str(args.limit)]
        cmd += ["--out", str(args.out / task), "--force"]
        for t in eval_tasks:
            cmd += ["--task", t]
        for m in args.method or []:
            cmd += ["--method", m]
        for k in args.keep or []:
            cmd += ["--keep", k]
        if args.no_novice:
            cmd.append("--no-novice")
        run(*cmd)
        took = time.perf_counter() - started
        table = (args.out / task / "results.md").read_text()
        sections.append(
            f"### Domain: {task} ({args.demos} self-generated demonstrations, {took:.0f} s)\n\n{table}\n"
        )
    text = (
        "## Quality on the testbed\n\n"
        f"Command: `python benchmarks/bench_quality.py --limit {args.limit}"
        + "".join(f" --task {t}" for t in args.task or [])
        + "".join(f" --method {m}" for m in args.method or [])
        + "".join(f" --keep {k}" for k in args.keep or [])
        + (" --no-novice" if args.no_novice else "")
        + "`\n\n"
        + "\n".join(sections)
    )
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
