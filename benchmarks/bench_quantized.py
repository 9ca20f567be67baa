"""Real width: profile (offloaded), plan and prune fp8 and mxfp4 checkpoints at published widths.

Generates, streaming tensor by tensor (never holding a tensor bigger than a 64 MB pool of random
values, never building the model), with :func:`moeprune.testing.quantized.random_fp8` /
:func:`~moeprune.testing.quantized.random_mxfp4`:

- ``deepseek``: a DeepSeek-V3-width block-fp8 checkpoint in the hub layout (config as published:
  hidden 7168, 256 routed + 1 shared expert, moe_intermediate 2048, dense intermediate 18432,
  top-8 of 8 groups (4 groups), MLA q_lora 1536 / kv_lora 512 / nope 128 / rope 64 / v 128,
  128 heads, vocab 129280, yarn rope; ``float8_e4m3fn`` weights with float32 ``weight_scale_inv``
  per 128x128 block, ``quantization_config`` as DeepSeek-V3 publishes it (no
  ``modules_to_not_convert``: the embeddings, router, norms and LM head are simply stored bf16,
  the selection bias float32) with 1 dense + 2 MoE layers (about 27 GB; no MTP layer);
- ``gpt-oss``: a gpt-oss-120b-width mxfp4 checkpoint (hidden 2880, 128 experts, top-4,
  intermediate 2880, 64 query / 8 kv heads of 64, vocab 201088, ``*_blocks`` / ``*_scales``,
  ``modules_to_not_convert`` as published) with 2 layers (about 5.7 GB).

A character-level tokenizer is saved beside each (ids < 100: the vocabulary is the model's).
Then it runs the CLI as child processes under ``/usr/bin/time -v`` (peak RSS = its "Maximum
resident set size"), each after ``sync`` and dropping the page cache (``echo 3 >
/proc/sys/vm/drop_caches``, which needs root; the report says when it could not):

1. ``cat`` of every shard to /dev/null: the time to read the bytes;
2. ``moeprune profile CKPT --data DEMOS --offload sequential`` on the testbed's dates + numbers
   demonstrations (a seeded subset of ``--records`` records, one batch);
3. ``moeprune plan P --method frequency --keep K`` (K: half the experts, i.e. 128 / 64);
4. ``cp`` of whole source shards adding up to about the bytes the pruned model keeps, then
   ``sync``, scaled to exactly the kept bytes; and ``moeprune prune CKPT --plan ... --out D``
   then ``sync``.

It prints peak RSS against one decoder layer as stored and against the checkpoint, profile time
against ``cat``, rewrite time against ``cp``, and the output size; ``--append`` adds the tables to a
markdown file. Everything generated is deleted at the end (``--keep-files`` keeps it).

    python benchmarks/bench_quantized.py [--model deepseek,gpt-oss] [--width full|small]
        [--dir /tmp/realwidth] [--records 80] [--append docs/benchmarks.md]

``--width small`` (and ``--experts``, ``--moe-layers``) is for trying the script out: the same
layouts at a fraction of the size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMOS = [
    ROOT / "src/moeprune/testbed/data/dates.calib.jsonl",
    ROOT / "src/moeprune/testbed/data/numbers.calib.jsonl",
]
GB = 1e9


# --- the models -----------------------------------------------------------------------------------


def deepseek_config(width: str, moe_layers: int, experts: int | None):
    """DeepSeek-V3's published config.json (deepseek-ai/DeepSeek-V3), 1 dense + ``moe_layers``
    MoE layers, no multi-token-prediction layer."""
    from transformers import DeepseekV3Config

    kw = dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_scaling={
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        rope_theta=10000,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        first_k_dense_replace=1,
        num_hidden_layers=1 + moe_layers,
    )
    if width == "small":
        kw.update(
            hidden_size=1024,
            intermediate_size=2048,
            moe_intermediate_size=256,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=32,
            q_lora_rank=384,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
        )
    if experts:
        kw["n_routed_experts"] = experts
    return DeepseekV3Config(**kw)


def gpt_oss_config(width: str, layers: int, experts: int | None):
    """gpt-oss-120b's published config.json (openai/gpt-oss-120b) with ``layers`` layers."""
    from transformers import GptOssConfig

    kw = dict(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_local_experts=128,
        num_experts_per_tok=4,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        sliding_window=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        swiglu_limit=7.0,
        eos_token_id=200002,
        pad_token_id=199999,
        tie_word_embeddings=False,
        num_hidden_layers=layers,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )
    if width == "small":
        kw.update(hidden_size=512, intermediate_size=512, num_local_experts=32, num_attention_heads=8)
    if experts:
        kw["num_local_experts"] = experts
    return GptOssConfig(**kw)


def generate(name: str, out: Path, args: argparse.Namespace) -> tuple[int, int, int]:
    """Write the checkpoint; returns (bytes of tensor data, routed experts per layer, hidden)."""
    from moeprune.testing.quantized import random_fp8, random_mxfp4
    from moeprune.testing.tiny import byte_tokenizer

    shard = int(args.shard_gb * GB)
    if name == "deepseek":
        cfg = deepseek_config(args.width, args.moe_layers, args.experts)
        total = random_fp8(cfg, out, block_size=(128, 128), style="deepseek", shard_bytes=shard)
        experts = cfg.n_routed_experts
    else:
        cfg = gpt_oss_config(args.width, args.moe_layers, args.experts)
        total = random_mxfp4(cfg, out, shard_bytes=shard)
        experts = cfg.num_local_experts
    byte_tokenizer().save_pretrained(out)
    return total, experts, cfg.hidden_size


# --- measuring ------------------------------------------------------------------------------------


def drop_caches() -> bool:
    """sync, then drop the page cache (root only): every run reads its input from the disk."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes
    min_available: int = 0  # MemAvailable of the machine, lowest seen while it ran (bytes)
    cpu_seconds: float = 0.0  # user + system: on a shared machine, steadier than the wall time
    output: str = ""


def mem_available() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024


def measure(cmd: list[str], env: dict[str, str], log: Path, then_sync: bool = False) -> Run:
    """Run ``cmd`` under ``/usr/bin/time -v`` (then ``sync`` when asked, counted in the time);
    fail loudly with its output if it fails."""
    import threading

    lowest = [mem_available()]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            lowest[0] = min(lowest[0], mem_available())

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if then_sync:
        subprocess.run(["sync"], check=False)
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    return Run(seconds, rss, lowest[0], cpu, proc.stdout + proc.stderr)


def layer_bytes(directory: Path) -> dict[int, int]:
    """Bytes each decoder layer takes as stored."""
    from moeprune.checkpoint import Checkpoint

    sizes: dict[int, int] = {}
    for key, info in Checkpoint.open(directory).tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if m:
            sizes[int(m.group(1))] = sizes.get(int(m.group(1)), 0) + info.nbytes
    return sizes


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def time_cp(src: Path, dst: Path, kept: int) -> tuple[float, int]:
    """Seconds to cp (and sync) whole source shards adding up to about ``kept`` bytes, scaled to
    exactly ``kept``; the copy is deleted."""
    chosen, size = [], 0
    for path in shards(src):
        if size >= kept:
            break
        chosen.append(path)
        size += path.stat().st_size
    dst.mkdir()
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", *map(str, chosen), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return seconds * kept / size, size


@dataclass
class Result:
    name: str
    rows: list[tuple[str, str]] = field(default_factory=list)


def bench(name: str, args: argparse.Namespace, env: dict[str, str]) -> Result:
    work = args.dir / name
    src, out = work / "src", work / "pruned"
    reuse = args.reuse and (src / "config.json").exists()
    if work.exists():
        for path in work.iterdir():
            if not (reuse and path == src):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "moeprune"]
    try:
        t0 = time.perf_counter()
        if reuse:  # a checkpoint this script generated before (--keep-files)
            cfg = json.loads((src / "config.json").read_text())
            experts = cfg.get("n_routed_experts") or cfg["num_local_experts"]
            hidden = cfg["hidden_size"]
        else:
            _total, experts, hidden = generate(name, src, args)
        gen_s = time.perf_counter() - t0
        layers = layer_bytes(src)
        largest = max(layers.values())
        n_shards = len(shards(src))
        ckpt_bytes = sum(p.stat().st_size for p in shards(src))
        print(
            f"[{name}] generated {ckpt_bytes / GB:.2f} GB in {n_shards} shards in {gen_s:.0f} s", flush=True
        )

        dropped = drop_caches()
        cat = measure(
            ["sh", "-c", "cat " + " ".join(map(str, shards(src))) + " > /dev/null"], env, work / "cat.log"
        )
        print(f"[{name}] cat {cat.seconds:.1f} s", flush=True)

        imports = measure(
            [
                sys.executable,
                "-c",
                "import torch, transformers, moeprune.cli; from transformers import "
                + ("DeepseekV3ForCausalLM" if name == "deepseek" else "GptOssForCausalLM"),
            ],
            env,
            work / "imports.log",
        )
        while mem_available() < args.min_available_gb * GB:
            print(f"[{name}] waiting: MemAvailable {mem_available() / GB:.1f} GB", flush=True)
            time.sleep(30)
        data = work / "demos.jsonl"
        records = [line for path in DEMOS for line in path.read_text().splitlines() if line.strip()]
        data.write_text("\n".join(records) + "\n")
        prof = work / "p.profile.safetensors"
        drop_caches()
        profile_cmd = [
            *py, "profile", str(src), "--data", str(data), "--out", str(prof), "--offload", "sequential",
            "--device", "cpu", "--max-samples", str(args.records), "--batch-size", str(args.records),
        ]  # fmt: skip
        profile = measure(profile_cmd, env, work / "profile.log")
        print(
            f"[{name}] profile {profile.seconds:.1f} s, peak RSS {profile.peak_rss / GB:.2f} GB", flush=True
        )
        tokens = _tokens(prof, args.records)

        keep = args.keep or experts // 2
        plan = work / "plan.json"
        planned = measure(
            [*py, "plan", str(prof), "--method", "frequency", "--keep", str(keep), "--out", str(plan)],
            env,
            work / "plan.log",
        )
        kept_bytes = _kept_bytes(src, plan)
        cp_s, cp_bytes = time_cp(src, work / "cp", kept_bytes)
        print(f"[{name}] cp {cp_s:.1f} s (scaled from {cp_bytes / GB:.2f} GB)", flush=True)
        drop_caches()
        prune = measure(
            [*py, "prune", str(src), "--plan", str(plan), "--out", str(out)], env, work / "prune.log", True
        )
        out_bytes = sum(p.stat().st_size for p in shards(out))
        print(f"[{name}] prune {prune.seconds:.1f} s, output {out_bytes / GB:.2f} GB", flush=True)
        if args.keep_files:
            print(f"[{name}] kept: {work}")

        acts = tokens["padded"] * hidden * 4  # float32 hidden states between layers
        goal = 1.5 * largest + acts
        label = "fp8 e4m3, 128x128 blocks" if name == "deepseek" else "mxfp4"
        rows = [
            ("checkpoint", f"{ckpt_bytes / GB:.2f} GB ({label}), {len(layers)} layers, {n_shards} shards, "
             f"{'reused (--reuse)' if reuse else f'generated in {gen_s:.0f} s'}"),
            ("one decoder layer as stored (largest)", f"{largest / GB:.2f} GB"),
            ("calibration", f"{tokens['real']} tokens in {args.records} records (one batch, "
             f"{tokens['padded']} padded), hidden states {acts / 1e6:.0f} MB (float32)"),
            ("page cache dropped before each run", "yes" if dropped else "no (not root)"),
            ("cat of the shards > /dev/null", f"{cat.seconds:.1f} s ({ckpt_bytes / GB / cat.seconds:.2f} GB/s)"),
            ("RSS after imports (torch, transformers, moeprune)", f"{imports.peak_rss / GB:.2f} GB"),
            ("profile --offload sequential, peak RSS",
             f"{profile.peak_rss / GB:.2f} GB = {profile.peak_rss / largest:.2f} x the layer, "
             f"{100 * profile.peak_rss / ckpt_bytes:.0f}% of the checkpoint "
             f"(goal <= 1.5 x layer + activations = {goal / GB:.2f} GB: "
             f"{'met' if profile.peak_rss <= goal else 'missed'})"),
            ("profile, whole call", f"{profile.seconds:.0f} s = {profile.seconds / cat.seconds:.1f} x cat "
             f"(CPU time {profile.cpu_seconds:.0f} s)"),
            (f"plan (keep {keep} of {experts})", f"{planned.seconds:.1f} s"),
            ("cp of the kept bytes, then sync", f"{cp_s:.1f} s (scaled from cp of {cp_bytes / GB:.2f} GB)"),
            ("prune (remove), whole call, then sync",
             f"{prune.seconds:.1f} s = {prune.seconds / cp_s:.2f} x cp "
             f"(goal <= 1.2: {'met' if prune.seconds <= 1.2 * cp_s else 'missed'}), "
             f"peak RSS {prune.peak_rss / GB:.2f} GB, CPU time {prune.cpu_seconds:.0f} s"),
            ("pruned model", f"{out_bytes / GB:.2f} GB in {len(shards(out))} shards "
             f"({100 * out_bytes / ckpt_bytes:.0f}% of the checkpoint; kept tensor bytes {kept_bytes / GB:.2f} GB)"),
            ("lowest MemAvailable of the machine during profile", f"{profile.min_available / GB:.1f} GB"),
        ]  # fmt: skip
        return Result(name, rows)
    finally:
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)


def _tokens(profile: Path, records: int) -> dict[str, int]:
    """Real tokens the profile counted, and the padded size of the one batch (records x the
    longest record)."""
    from safetensors import safe_open

    with safe_open(str(profile), framework="pt") as fh:
        real = int(fh.get_tensor("tokens").item())
        names = set(fh.keys())
        longest = int(fh.get_tensor("sample_tokens").max().item()) if "sample_tokens" in names else 0
    return {"real": real, "padded": max(real, records * longest)}


def _kept_bytes(src: Path, plan: Path) -> int:
    """Bytes of the tensors the pruned model keeps: every tensor but the removed routed experts
    (and their scales); router rows are left whole (a rounding error here)."""
    from moeprune.checkpoint import Checkpoint

    data = json.loads(plan.read_text())
    kept = [len(ids) for ids in data["kept"].values()]
    fraction = sum(kept) / (len(kept) * int(data["num_experts"]))
    ckpt = Checkpoint.open(src)
    experts = sum(i.nbytes for k, i in ckpt.tensors.items() if ".mlp.experts." in k)
    return ckpt.total_bytes - round(experts * (1 - fraction))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepseek,gpt-oss", help="comma-separated: deepseek, gpt-oss")
    parser.add_argument("--width", choices=("full", "small"), default="full")
    parser.add_argument("--experts", type=int, default=None, help="routed experts (default: as published)")
    parser.add_argument("--moe-layers", type=int, default=2, help="MoE layers (deepseek adds 1 dense)")
    parser.add_argument("--keep", type=int, default=None, help="experts kept per layer (default: half)")
    parser.add_argument("--records", type=int, default=80, help="demonstrations profiled (one batch)")
    parser.add_argument("--shard-gb", type=float, default=4.3, help="shard size (DeepSeek-V3's are ~4.3 GB)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/realwidth"))
    parser.add_argument("--min-available-gb", type=float, default=0, help="wait for this much MemAvailable")
    parser.add_argument("--keep-files", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse a checkpoint kept by --keep-files")
    parser.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    results = [bench(name.strip(), args, env) for name in args.model.split(",") if name.strip()]
    for r in results:
        print(f"\n## {r.name}\n")
        for k, v in r.rows:
            print(f"{k}: {v}")
    if args.append:
        _append(args, results)


def _append(args: argparse.Namespace, results: list[Result]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _models import kv_table

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = args.append.read_text() if args.append.exists() else "# Benchmarks\n"
    for r in results:
        text = text.rstrip("\n") + f"\n\n### {r.name} ({args.width} width; load at the end: `{load}`)\n\n"
        text += kv_table(r.rows) + "\n"
    args.append.write_text(text)


if __name__ == "__main__":
    main()
