#!/usr/bin/env bash
# Opt-in (not in CI): serve uniform, ragged and novice prunes with vLLM (CPU build, through
# moeprune's vllm_plugin) and compare greedy outputs with moeprune.load on 20 prompts, for the
# testbed (DeepSeek-V3 style) and tiny random Qwen3-MoE and Mixtral models with its tokenizer.
# Needs scripts/vllm_venv.sh first (or VLLM_VENV pointing at a venv with vllm and moeprune).
# Usage: scripts/check_vllm.sh [WORK_DIR] [testbed|qwen3_moe|mixtral ...]
#        (default /tmp/moeprune-vllm-check, all three; each family is one vLLM process)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/moeprune-vllm-check}
FAMILIES=(testbed qwen3_moe mixtral)
if [ $# -gt 1 ]; then FAMILIES=("${@:2}"); fi
VENV=${VLLM_VENV:-/tmp/vllm/venv}
PY=${PYTHON:-python}  # moeprune's own environment (transformers of the project's pins)
[ -x "$VENV/bin/python" ] || { echo "no vLLM venv at $VENV: run scripts/vllm_venv.sh" >&2; exit 2; }
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
DATA=$("$PY" -c 'from moeprune.testbed import data_file; print(data_file("dates", "calib"))')
mkdir -p "$WORK"
prune() { "$PY" -m moeprune prune "$1" --data "$DATA" --method frequency --force -o "$2" "${@:3}" >/dev/null; }
status=0
for family in "${FAMILIES[@]}"; do
  case $family in
    testbed)  # 32 experts, top-4, 4 groups
      SRC=$("$PY" -c 'from moeprune.testbed import testbed_path; print(testbed_path())')
      UNIFORM=(--keep 16); RAGGED=(--keep 0.5) ;;
    qwen3_moe)  # 8 experts, top-2; a global --keep 0.6 gives 6/5/4 (0.5 fell 4/4/4 with head_dim 16)
      "$PY" "$ROOT/scripts/vllm_compare.py" tiny "$WORK" qwen3_moe; SRC=$WORK/qwen3_moe
      UNIFORM=(--keep 4); RAGGED=(--keep 0.6) ;;
    mixtral)  # 8 experts, top-2
      "$PY" "$ROOT/scripts/vllm_compare.py" tiny "$WORK" mixtral; SRC=$WORK/mixtral
      UNIFORM=(--keep 4); RAGGED=(--keep 0.5) ;;
    *) echo "unknown family $family (testbed, qwen3_moe, mixtral)" >&2; exit 2 ;;
  esac
  OUT=$WORK/$family
  prune "$SRC" "$OUT-uniform" "${UNIFORM[@]}"                 # same count in every layer: stock layout
  prune "$SRC" "$OUT-ragged" "${RAGGED[@]}" --scope global      # a different count per layer
  prune "$SRC" "$OUT-novice" --keep 0.5 --mode novice           # MoNE: the router keeps all E rows
  "$PY" "$ROOT/scripts/vllm_compare.py" reference "$WORK/$family-ref.json" "$OUT-uniform" "$OUT-ragged" "$OUT-novice"
  # VLLM_MLA_DISABLE (DeepSeek only): vLLM's MLA backends refuse the testbed's head size
  # (48 = kv_lora 32 + rope 16); in-process engine: no worker processes on a shared CPU machine
  VLLM_MLA_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" "$ROOT/scripts/vllm_compare.py" \
    vllm "$WORK/$family-ref.json" || status=1
done
exit $status
