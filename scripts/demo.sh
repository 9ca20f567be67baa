#!/usr/bin/env bash
# The README's first command: set up, then run the main job end to end on the built-in testbed:
# profile the testbed on 25 demonstrations of one task (the model answering them itself); compare
# EASY-EP with the frequency and random baselines at 50% and 25% of the experts kept (the testbed
# answers its tasks perfectly, so only a keep where the methods differ tells them apart); write the
# EASY-EP 50% checkpoint and check that it gives compare's numbers; then serve three tasks from a
# pattern library, loading only each prompt's task experts, each prompt shown with its answer.
# About 2 minutes on 2 idle CPU cores.
#
# OUT_DIR (default runs/demo) is replaced on each run, but only if an earlier run of this demo made
# it. TASK picks the task (numbers, reverse or dates). SKIP_SETUP=1 uses the python and moeprune
# already on PATH instead of scripts/setup.sh and .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-runs/demo}
TASK=${TASK:-reverse}
case "$OUT" in
  "" | / | . | .. | "$HOME" | "$HOME/")
    echo "demo.sh: refusing OUT_DIR='$OUT': give a folder of its own" >&2
    exit 2
    ;;
esac
if [ -e "$OUT" ] && [ ! -f "$OUT/.moeprune-demo" ]; then
  echo "demo.sh: '$OUT' exists and was not made by this demo; remove it yourself or set OUT_DIR to a new folder" >&2
  exit 2
fi
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
  . .venv/bin/activate
fi
TESTBED=$(python -c 'from moeprune.testbed import testbed_path; print(testbed_path())')
DATA=$(python -c 'from moeprune.testbed import DATA_DIR; print(DATA_DIR)')
rm -rf -- "$OUT"
mkdir -p "$OUT"
touch "$OUT/.moeprune-demo"
head -n 25 "$DATA/$TASK.calib.jsonl" > "$OUT/demos.jsonl"
# held-out records per task, and python source as text the model was not calibrated on
EVAL=(--task "testbed:$TASK" --task testbed:python --limit 30 --max-length 256)

echo "== 1. the testbed model"
moeprune inspect "$TESTBED"

echo "== 2. calibrate on 25 '$TASK' demonstrations, the model answering them itself"
moeprune profile "$TESTBED" --data "$OUT/demos.jsonl" --self-generate 24 \
  --out "$OUT/$TASK.profile.safetensors"

echo "== 3. which experts to keep: EASY-EP against the frequency and random baselines, 50% and 25% kept"
moeprune compare "$TESTBED" --profile "$OUT/$TASK.profile.safetensors" "${EVAL[@]}" \
  --method easyep --method frequency --method random --keep 0.5 --keep 0.25 --no-novice \
  --out "$OUT/compare"

echo "== 4. write the EASY-EP 50% checkpoint (streamed shard by shard) and evaluate it"
moeprune plan "$OUT/$TASK.profile.safetensors" --method easyep --keep 0.5 --model "$TESTBED" \
  --out "$OUT/plan.json"
moeprune prune "$TESTBED" --plan "$OUT/plan.json" --mode remove \
  --profile "$OUT/$TASK.profile.safetensors" --out "$OUT/pruned"
moeprune eval "$OUT/pruned" "${EVAL[@]}" --output "$OUT/pruned.eval.json"
python scripts/demo_summary.py "$OUT" "$TASK"

echo
echo "== 5. task-adaptive serving: a library of three tasks; each prompt is routed and only its"
echo "      task's experts are read from the original checkpoint"
LIBTASKS=()
for t in numbers reverse dates; do LIBTASKS+=(--task "$t=$DATA/$t.calib.jsonl"); done
moeprune library build "$TESTBED" "${LIBTASKS[@]}" --keep 16 --max-samples 25 --out "$OUT/library" -q
moeprune generate "$TESTBED" --library "$OUT/library" --max-new-tokens 16 \
  --prompt "Number 2026 in English: " --prompt "Date 2026-11-23 in words: " --prompt $'reverse: m o e\n=> '
echo
echo "all outputs in $OUT/ (profile, compare/, plan.json, pruned/ with its model card, eval JSON, library/)"
