#!/usr/bin/env bash
# Opt-in (not in CI): serve uniform, ragged and novice prunes with vLLM (CPU build, through
# moeprune's vllm_plugin) and compare greedy outputs with moeprune.load on 20 prompts, per family:
# the testbed (DeepSeek-V3) and tiny random Qwen3-MoE, Mixtral and gpt-oss with its tokenizer.
# Needs scripts/vllm_venv.sh first (or VLLM_VENV pointing at a venv with vllm and moeprune).
# Usage: scripts/check_vllm.sh [WORK_DIR [FAMILY ...]]   (default /tmp/moeprune-vllm-check, all
# families: testbed qwen3_moe mixtral gpt_oss; each family is one vLLM process)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/moeprune-vllm-check}
FAMILIES=("${@:2}")
[ ${#FAMILIES[@]} -gt 0 ] || FAMILIES=(testbed qwen3_moe mixtral gpt_oss)
VENV=${VLLM_VENV:-/tmp/vllm/venv}
PY=${PYTHON:-python}  # moeprune's own environment (transformers of the project's pins)
[ -x "$VENV/bin/python" ] || { echo "no vLLM venv at $VENV: run scripts/vllm_venv.sh" >&2; exit 2; }
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
DATA=$("$PY" -c 'from moeprune.testbed import data_file; print(data_file("dates", "calib"))')
mkdir -p "$WORK"
# prune SRC NAME ARGS...: WORK/NAME, frequency on the dates calibration data
prune() { "$PY" -m moeprune prune "$1" --data "$DATA" --method frequency --force -o "$WORK/$2" "${@:3}" >/dev/null; }
# in-process engine: no worker processes to spawn on a shared CPU machine
vllm_side() { VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" "$ROOT/scripts/vllm_compare.py" vllm "$@"; }
failed=0

testbed() {
  local tb
  tb=$("$PY" -c 'from moeprune.testbed import testbed_path; print(testbed_path())')
  prune "$tb" testbed-uniform --keep 16                       # same count in every layer: stock layout
  prune "$tb" testbed-ragged --keep 0.5 --scope global        # a different count per layer
  prune "$tb" testbed-novice --keep 0.5 --mode novice         # MoNE: router keeps all 32 rows
  "$PY" "$ROOT/scripts/vllm_compare.py" reference "$WORK/ref-testbed.json" \
    "$WORK/testbed-uniform" "$WORK/testbed-ragged" "$WORK/testbed-novice"
  # VLLM_MLA_DISABLE: vLLM's MLA backends refuse the testbed's head size (48 = kv_lora 32 + rope 16)
  VLLM_MLA_DISABLE=1 vllm_side "$WORK/ref-testbed.json"
}

# tiny FAMILY UNIFORM_KEEP RAGGED_KEEP: a tiny random model, pruned uniform / ragged / novice
tiny() {
  "$PY" "$ROOT/scripts/vllm_compare.py" tiny "$WORK" "$1"
  local src="$WORK/$1"
  prune "$src" "$1-uniform" --keep "$2"
  prune "$src" "$1-ragged" --keep "$3" --scope global
  prune "$src" "$1-novice" --keep 0.5 --mode novice
  "$PY" "$ROOT/scripts/vllm_compare.py" reference "$WORK/ref-$1.json" \
    "$WORK/$1-uniform" "$WORK/$1-ragged" "$WORK/$1-novice"
  vllm_side "$WORK/ref-$1.json"
}

# 8 experts, top-2, 3 layers; a global --keep 0.6 gives 6/5/4 (0.5 fell 4/4/4 with head_dim 16)
qwen3_moe() { tiny qwen3_moe 4 0.6; }
mixtral() { tiny mixtral 4 0.5; }  # 8 experts, top-2, 3 layers

gpt_oss() {
  # 8 experts, top-2, 4 layers; ragged (3/6/4/5 experts) is written by the script itself
  "$PY" "$ROOT/scripts/vllm_compare.py" tiny "$WORK" gpt_oss
  local src="$WORK/gpt_oss"
  prune "$src" gpt_oss-uniform --keep 4
  prune "$src" gpt_oss-novice --keep 0.5 --mode novice                   # novice_outputs buffer
  prune "$src" gpt_oss-novice-bias --keep 0.5 --mode novice --pad-uniform # down_bias: stock
  "$PY" "$ROOT/scripts/vllm_compare.py" reference "$WORK/ref-gpt_oss.json" "$src" \
    "$WORK/gpt_oss-uniform" "$WORK/gpt_oss-ragged" "$WORK/gpt_oss-novice" "$WORK/gpt_oss-novice-bias"
  vllm_side "$WORK/ref-gpt_oss.json"
}

for family in "${FAMILIES[@]}"; do
  declare -F "$family" >/dev/null || { echo "unknown family '$family' (testbed, qwen3_moe, mixtral, gpt_oss)" >&2; exit 2; }
done
for family in "${FAMILIES[@]}"; do
  echo "== $family"
  # a subshell with errexit: the first failing step ends this family, the next one still runs
  set +e
  (set -e; "$family")
  [ $? -eq 0 ] || failed=1
  set -e
done
exit $failed
