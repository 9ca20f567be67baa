"""What the demo's numbers say: `python scripts/demo_summary.py OUT TASK` (run by scripts/demo.sh).

Reads OUT/compare/results.json (`moeprune compare`) and OUT/pruned.eval.json (`moeprune eval` of
the written checkpoint) and prints the method comparison per keep, one line on what the
perplexity change means, and whether the written checkpoint gives compare's numbers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TEXT_TASK = "python"  # the perplexity task: source code, unlike the calibration demonstrations


def weights_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def main(out: Path, task: str) -> None:
    from moeprune.testbed import testbed_path

    cmp = json.loads((out / "compare" / "results.json").read_text())
    pruned = json.loads((out / "pruned.eval.json").read_text())["tasks"]
    rows = cmp["rows"]
    full = next(r for r in rows if r["mode"] == "full")
    experts = cmp["num_experts"]

    def value(row: dict, name: str, metric: str) -> float:
        return float(row["tasks"][name][metric])

    print(f"\n'{task}' accuracy on held-out records (full model {value(full, task, 'accuracy'):.2f}):")
    for k in dict.fromkeys(r["experts"] for r in rows if r["mode"] == "mask"):
        same = [r for r in rows if r["mode"] == "mask" and r["experts"] == k]
        cells = "   ".join(f"{r['method']} {value(r, task, 'accuracy'):.2f}" for r in same)
        print(f"  {k:>2}/{experts} experts kept: {cells}")

    easyep = next(r for r in rows if r["mode"] == "mask" and r["method"] == "easyep" and r["experts"] * 2 == experts)
    before, after = value(full, TEXT_TASK, "perplexity"), value(easyep, TEXT_TASK, "perplexity")
    ratio = after / before
    kept = value(easyep, task, "accuracy") / value(full, task, "accuracy")
    print(
        f"\n{TEXT_TASK} perplexity, on text unlike the demonstrations: full {before:.1f} -> EASY-EP 50% "
        f"{after:.1f} ({ratio - 1:+.1%}).\n  That is: on text it was not calibrated for, the pruned model "
        f"gives each actual next token {1 - 1 / ratio:.1%} less\n  probability on average (geometric "
        f"mean), while '{task}' keeps {kept:.0%} of its accuracy."
    )

    acc, ppl = pruned[task]["metrics"]["accuracy"], pruned[TEXT_TASK]["metrics"]["perplexity"]
    same = math.isclose(acc, value(easyep, task, "accuracy")) and math.isclose(ppl, after, rel_tol=1e-3)
    print(
        f"\nwritten checkpoint: '{task}' accuracy {acc:.2f}, {TEXT_TASK} perplexity {ppl:.1f}"
        + (" -- the numbers of compare's EASY-EP 50% row" if same else " -- NOT compare's EASY-EP 50% row")
        + f"; weights {weights_mb(testbed_path()):.1f} MB -> {weights_mb(out / 'pruned'):.1f} MB"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
