#!/usr/bin/env bash
# The README's first command: set up, then run the main job end to end on the built-in testbed:
# profile the testbed on 25 demonstrations of one task, keep half the experts with EASY-EP,
# write the pruned checkpoint, and evaluate full vs pruned; then serve three tasks from a pattern
# library, loading only each prompt's task experts. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT_DIR:-runs/demo}
TASK=${TASK:-dates}
TESTBED=$(python -c 'from moeprune.testbed import testbed_path; print(testbed_path())')
DATA=$(python -c 'from moeprune.testbed import DATA_DIR; print(DATA_DIR)')
rm -rf "$OUT" && mkdir -p "$OUT"
head -n 25 "$DATA/$TASK.calib.jsonl" > "$OUT/demos.jsonl"

echo "== 1. the testbed model"
moeprune inspect "$TESTBED"

echo "== 2. calibrate on 25 '$TASK' demonstrations, the model answering them itself"
moeprune profile "$TESTBED" --data "$OUT/demos.jsonl" --self-generate 24 --per-sample \
  --out "$OUT/$TASK.profile.safetensors"

echo "== 3. keep 50% of the experts of every MoE layer by EASY-EP score"
moeprune plan "$OUT/$TASK.profile.safetensors" --method easyep --keep 0.5 --model "$TESTBED" \
  --out "$OUT/plan.json"

echo "== 4. write the pruned checkpoint (streamed shard by shard)"
moeprune prune "$TESTBED" --plan "$OUT/plan.json" --mode remove \
  --profile "$OUT/$TASK.profile.safetensors" --out "$OUT/pruned"

echo "== 5. evaluate full vs pruned on held-out data"
TASKS=(--task "testbed:$TASK" --task testbed:python --task testbed:prose)
moeprune eval "$TESTBED" "${TASKS[@]}" --limit 100 --output "$OUT/full.eval.json"
moeprune eval "$OUT/pruned" "${TASKS[@]}" --limit 100 --output "$OUT/pruned.eval.json"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
full, pruned = (json.loads((out / f"{n}.eval.json").read_text()) for n in ("full", "pruned"))
size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
from moeprune.testbed import testbed_path
print(f"\nweights: full {size(testbed_path()) / 1e6:.1f} MB -> pruned {size(out / 'pruned') / 1e6:.1f} MB")
print(f"{'task':<22}{'metric':<14}{'full':>10}{'pruned':>10}")
for name, res in full["tasks"].items():
    for metric, value in res["metrics"].items():
        if metric in ("accuracy", "perplexity"):
            print(f"{name:<22}{metric:<14}{value:>10.3f}{pruned['tasks'][name]['metrics'][metric]:>10.3f}")
PY

echo "== 6. task-adaptive serving: a library of the three tasks; each prompt is routed and only"
echo "      its task's experts are read from the original checkpoint"
LIBTASKS=()
for t in numbers reverse dates; do LIBTASKS+=(--task "$t=$DATA/$t.calib.jsonl"); done
moeprune library build "$TESTBED" "${LIBTASKS[@]}" --keep 16 --max-samples 25 --out "$OUT/library" -q
moeprune generate "$TESTBED" --library "$OUT/library" --max-new-tokens 16 --stop $'\n' \
  --prompt "Number 2026 in English: " --prompt "Date 2026-11-23 in words: " --prompt $'reverse: m o e\n=> '
echo
echo "all outputs in $OUT/ (profile, plan.json, pruned/ with its model card, eval JSON, library/)"
