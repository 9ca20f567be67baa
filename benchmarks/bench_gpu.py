"""Issue 17, item 6: calibration and the pruned model's generation on a GPU, in one prepared run.

A random model of Qwen3-30B-A3B's width (hidden 2048, 128 experts of width 768, top-8, 32 query
and 4 KV heads of 128, vocabulary 151,936; ``--layers`` MoE layers instead of 48), in bfloat16 on
``--device``:

1. **Calibration.** The stock forward with each experts implementation that fits (``grouped_mm``,
   transformers' default, and ``eager``; ``batched_mm`` gathers a weight copy per token and slot
   and is tried only with ``--batched-mm``) against ``calibrate()`` over the same batches, runs
   alternating, medians of ``--repeats``: tokens/s, calibration / fastest stock forward, peak memory.
   Under ``torchrun --nproc_per_node N`` every rank calibrates its share of the records (moeprune's
   data-parallel calibration) and rank 0 prints the combined tokens/s; alone, the run says how many
   GPUs there are and the command for them.
2. **Generation of the pruned model.** The model is written with ``save_pretrained``, pruned by
   moeprune's rewrite to the 64 and 32 experts per layer that calibration routed most tokens to
   (uniform, so stock transformers loads them), and each of the three is loaded and timed in greedy
   ``generate`` (``--new`` tokens after a ``--prompt``-token prompt) at ``--gen-batches``: tokens/s,
   pruned / full, peak memory, and the weights' bytes.
3. **vLLM**, when it is importable: the same three folders through ``vllm.LLM`` (token ids in, no
   tokenizer), tokens/s at the largest batch. Otherwise the run says it is not installed.

Nothing in CI runs this (no GPU there). ``--device cpu --tiny`` runs every step on a small model
as a smoke check of the script itself.

    python benchmarks/bench_gpu.py [--layers 4] [--tokens 2048] [--batch 8] [--batches 4]
        [--repeats 3] [--gen-batches 1,16,64] [--prompt 128] [--new 64] [--device cuda] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _models import qwen3_config
from moeprune.arch import find_moe_blocks
from moeprune.calibrate import _forward_kwargs, calibrate, dist_info, init_distributed, wants_distributed
from moeprune.data import batches


def build(args: argparse.Namespace, device: torch.device):
    from transformers import AutoModelForCausalLM

    if args.tiny:
        cfg = qwen3_config(args.layers, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
                           num_experts=32, num_experts_per_tok=4, head_dim=32, vocab_size=4096)
    else:
        cfg = qwen3_config(
            args.layers,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=max(4096, args.tokens + args.prompt + args.new),
        )
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # diverse routing: router rows at a trained model's scale
        for b in find_moe_blocks(model):
            b.router(model).weight.normal_(0, 0.05)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


@torch.no_grad()
def calibration(model, args: argparse.Namespace, device: torch.device) -> tuple[list[str], dict]:
    info = dist_info()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    n = args.batch * args.batches * info.world
    seqs = [torch.randint(3, vocab, (args.tokens,), generator=g).tolist() for _ in range(n)]
    mine = list(range(info.rank, n, info.world))
    kwargs = _forward_kwargs(model)
    blocks = find_moe_blocks(model)
    impls = ["grouped_mm", "eager"] + (["batched_mm"] if args.batched_mm else [])

    def stock(impl: str):
        def run() -> None:
            model.set_experts_implementation(impl)
            try:
                for b in batches(seqs, args.batch, 0, order=mine):
                    model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), **kwargs)
            finally:
                model.set_experts_implementation("grouped_mm")

        return run

    kept_counts: dict = {}

    def calib() -> None:
        kept_counts["profile"] = calibrate(model, seqs, blocks=blocks, batch_size=args.batch)

    runs = {f"stock {i}": stock(i) for i in impls}
    runs["calibrate"] = calib
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, float] = {}
    for name, fn in list(runs.items()):  # warm-up; an implementation that does not fit is dropped
        try:
            peak_reset(device)
            fn()
            sync(device)
            peaks[name] = peak_gb(device)
        except torch.OutOfMemoryError:
            print(f"  {name}: out of memory, dropped", file=sys.stderr)
            del runs[name], times[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if info.rank == 0:
                print(f"  {name:20s} {times[name][-1]:7.3f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = len(seqs) * args.tokens  # every rank's records
    fastest = min((k for k in med if k.startswith("stock")), key=med.__getitem__)
    rows = [
        f"calibration, {len(blocks)} MoE layers, {len(seqs)} records x {args.tokens} tokens, batch {args.batch}, "
        f"{info.world} process(es):",
        "",
        "| run | median | tokens/s (all processes) | / fastest stock | peak memory (GB, this process) |",
        "|---|---|---|---|---|",
    ]
    for k, t in med.items():
        rows.append(f"| {k} | {t:.3f} s | {tokens / t:,.0f} | {t / med[fastest]:.3f} | {peaks.get(k, float('nan')):.1f} |")
    return rows, kept_counts["profile"]


def most_routed(profile: dict, keep: int) -> dict[int, list[int]]:
    """Per MoE layer (decoder index), the ``keep`` experts calibration routed most tokens to."""
    count = profile["count"]  # [L, E]
    return {i: sorted(torch.topk(count[j], keep).indices.tolist()) for j, i in enumerate(profile["_layers"])}


def save(model, profile: dict, tmp: Path) -> tuple[Path, int, int]:
    """Write the model (then it can be dropped); (folder, experts per layer, vocabulary)."""
    full_dir = tmp / "full"
    model.save_pretrained(full_dir)
    profile["_layers"] = [b.layer for b in find_moe_blocks(model)]
    return full_dir, model.config.num_experts, model.config.vocab_size


@torch.no_grad()
def generation(
    full_dir: Path, E: int, vocab: int, profile: dict, args: argparse.Namespace, device: torch.device, tmp: Path
) -> list[str]:
    from transformers import AutoModelForCausalLM

    from moeprune.surgery import rewrite_checkpoint

    dirs = {"full": full_dir}
    for keep in (E // 2, E // 4):
        dirs[f"{keep}/{E}"] = tmp / f"keep{keep}"
        t0 = time.perf_counter()
        rewrite_checkpoint(full_dir, dirs[f"{keep}/{E}"], most_routed(profile, keep))
        print(f"  rewrite to {keep}/{E}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    weights = {n: sum(f.stat().st_size for f in d.glob("*.safetensors")) / 1e9 for n, d in dirs.items()}
    rows = [
        f"generation (greedy, {args.prompt}-token prompt, {args.new} new tokens), transformers `generate`:",
        "",
        "| batch | model | weights (GB) | tokens/s | / full | peak memory (GB) |",
        "|---|---|---|---|---|---|",
    ]
    rates: dict[tuple[int, str], float] = {}
    for name, d in dirs.items():
        peak_reset(device)
        lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map=str(device)).eval()
        for batch in args.gen_batches:
            ids = torch.randint(3, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
            kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
            try:
                lm.generate(ids, **kw)  # warm-up
                t = []
                for _ in range(args.repeats):
                    sync(device)
                    t0 = time.perf_counter()
                    lm.generate(ids, **kw)
                    sync(device)
                    t.append(time.perf_counter() - t0)
                rates[(batch, name)] = batch * args.new / statistics.median(t)
            except torch.OutOfMemoryError:
                rates[(batch, name)] = float("nan")
            full = rates.get((batch, "full"), float("nan"))
            rows.append(
                f"| {batch} | {name} | {weights[name]:.2f} | {rates[(batch, name)]:,.0f} | "
                f"{rates[(batch, name)] / full:.2f} | {peak_gb(device):.1f} |"
            )
            print(rows[-1], file=sys.stderr)
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += ["", *vllm_rows(dirs, args, vocab)]
    return rows


def vllm_rows(dirs: dict[str, Path], args: argparse.Namespace, vocab: int) -> list[str]:
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as exc:  # not installed, or a build that does not match this torch
        return [f"vLLM: not run ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'not importable'})"]
    batch = max(args.gen_batches)
    rows = ["vLLM (token ids in, greedy, eager mode):", "", f"| model | tokens/s at batch {batch} |", "|---|---|"]
    g = torch.Generator().manual_seed(1)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, vocab, (args.prompt,), generator=g).tolist()) for _ in range(batch)]
    params = SamplingParams(max_tokens=args.new, min_tokens=args.new, temperature=0.0, ignore_eos=True)
    for name, d in dirs.items():
        try:
            llm = LLM(model=str(d), skip_tokenizer_init=True, enforce_eager=True, gpu_memory_utilization=0.6, dtype="bfloat16")
            llm.generate(prompts[:1], params)
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            rows.append(f"| {name} | {batch * args.new / (time.perf_counter() - t0):,.0f} |")
            del llm
        except Exception as exc:
            rows.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per calibration record")
    ap.add_argument("--batch", type=int, default=8, help="records per calibration batch")
    ap.add_argument("--batches", type=int, default=4, help="calibration batches per process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batched-mm", action="store_true", help="also time the batched_mm experts implementation")
    ap.add_argument("--tiny", action="store_true", help="a small model: a smoke check of this script")
    ap.add_argument("--skip-generation", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if wants_distributed():
        init_distributed(str(device))
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if device.type == "cuda" else device
    info = dist_info()
    if info.rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"torch {torch.__version__}; {name}; {gpus} GPU(s) visible; {info.world} process(es)")
        if info.world == 1 and gpus > 1:
            print(f"data-parallel calibration: torchrun --nproc_per_node {gpus} benchmarks/bench_gpu.py --skip-generation")
    model = build(args, device)
    rows, profile = calibration(model, args, device)
    if info.rank == 0:
        print("\n".join(rows), flush=True)
    if info.rank == 0 and not args.skip_generation:
        with tempfile.TemporaryDirectory(prefix="moeprune-bench-gpu-") as tmp:
            full_dir, experts, vocab = save(model, profile, Path(tmp))
            del model  # the folders are loaded one at a time: peak memory is each model's own
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows = generation(full_dir, experts, vocab, profile, args, device, Path(tmp))
            print("\n".join(rows), flush=True)
    if info.active:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
