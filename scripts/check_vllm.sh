#!/usr/bin/env bash
# Opt-in (not in CI): serve uniform, ragged and novice prunes of the testbed with vLLM (CPU build,
# through moeprune's vllm_plugin) and compare greedy outputs with moeprune.load on 20 prompts.
# Needs scripts/vllm_venv.sh first (or VLLM_VENV pointing at a venv with vllm and moeprune).
# Usage: scripts/check_vllm.sh [WORK_DIR]   (default /tmp/moeprune-vllm-check)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/moeprune-vllm-check}
VENV=${VLLM_VENV:-/tmp/vllm/venv}
PY=${PYTHON:-python}  # moeprune's own environment (transformers of the project's pins)
[ -x "$VENV/bin/python" ] || { echo "no vLLM venv at $VENV: run scripts/vllm_venv.sh" >&2; exit 2; }
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
TB=$("$PY" -c 'from moeprune.testbed import testbed_path; print(testbed_path())')
DATA=$("$PY" -c 'from moeprune.testbed import data_file; print(data_file("dates", "calib"))')
mkdir -p "$WORK"
prune() { "$PY" -m moeprune prune "$TB" --data "$DATA" --method frequency --force -o "$WORK/$1" "${@:2}" >/dev/null; }
prune uniform --keep 16                       # same count in every layer: stock layout
prune ragged --keep 0.5 --scope global        # a different count per layer
prune novice --keep 0.5 --mode novice         # MoNE: router keeps all 32 rows
"$PY" "$ROOT/scripts/vllm_compare.py" reference "$WORK/ref.json" "$WORK/uniform" "$WORK/ragged" "$WORK/novice"
# VLLM_MLA_DISABLE: vLLM's MLA backends refuse the testbed's head size (48 = kv_lora 32 + rope 16);
# in-process engine: no worker processes to spawn on a shared CPU machine
VLLM_MLA_DISABLE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VENV/bin/python" "$ROOT/scripts/vllm_compare.py" vllm "$WORK/ref.json"
