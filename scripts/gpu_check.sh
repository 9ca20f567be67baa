#!/usr/bin/env bash
# GPU smoke check: run moeprune's main paths on CUDA with its defaults (--device auto -> cuda,
# --dtype auto -> bfloat16) and compare with the CPU in float32. Needs a CUDA build of torch and
# moeprune importable (pip install -e . in an environment with CUDA torch). Not part of CI (no GPU
# there); the figures of the last run are in docs/benchmarks.md ("GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
M=src/moeprune/testbed/model
D=src/moeprune/testbed/data
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
echo "== eval: auto (cuda, bf16) vs cpu float32, the testbed's tasks, 100 records each"
moeprune eval $M --task testbed --limit 100 -o "$OUT/eval_gpu.json" --force
moeprune eval $M --task testbed --limit 100 --device cpu -o "$OUT/eval_cpu.json" --force
echo "== profile: cuda in memory, cuda --offload sequential (float32), cpu (float32), auto (cuda bf16)"
moeprune profile $M --data $D/dates.calib.jsonl --device cuda --dtype float32 -o "$OUT/p_gpu.safetensors" -q --force
moeprune profile $M --data $D/dates.calib.jsonl --device cuda --dtype float32 --offload sequential \
  -o "$OUT/p_off.safetensors" -q --force
moeprune profile $M --data $D/dates.calib.jsonl --device cpu -o "$OUT/p_cpu.safetensors" -q --force
moeprune profile $M --data $D/dates.calib.jsonl -o "$OUT/p_bf16.safetensors" -q --force
OUT=$OUT python - <<'PY'
import os

import torch

from moeprune.profile import Profile
from moeprune.score import score

out = os.environ["OUT"]
P = {k: Profile.load(f"{out}/p_{k}.safetensors") for k in ("gpu", "off", "cpu", "bf16")}
for m in ("easyep", "reap", "premoe", "frequency", "mone"):
    ref = score(P["cpu"], m)
    for k in ("gpu", "off", "bf16"):
        s = score(P[k], m)
        top = [set(torch.topk(row, 16).indices.tolist()) for row in s]
        same = top == [set(torch.topk(row, 16).indices.tolist()) for row in ref]
        rel = float(((s - ref).abs() / (ref.abs() + 1e-12)).max())
        print(f"{m:10s} {k:5s} max rel diff {rel:.2e}  same top-16 sets: {same}")
PY
echo "== the demo end to end (auto: cuda, bf16)"
start=$(date +%s)
SKIP_SETUP=1 OUT_DIR="$OUT/demo" bash scripts/demo.sh > "$OUT/demo.log" 2>&1
echo "demo rc=$? in $(( $(date +%s) - start )) s (log: $OUT/demo.log)"
