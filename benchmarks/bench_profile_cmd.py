"""`moeprune profile` with default settings, as a whole command, against the fastest stock forward.

Each measured thing is a fresh Python process (interpreter start to exit), run one after the
other, alternating, the order rotating each round; wall time and CPU time (the child's user +
system, from ``getrusage``) are taken by this script around the process:

- **command**: ``python -m moeprune profile MODEL --data FILE... --out X.profile.safetensors``,
  default settings (dtype ``auto``, batch size 8, max length 2048, progress bar and summary on,
  stderr to a pipe); with ``--base BASE/src`` the same command from that tree too (``PYTHONPATH``).
- **stock**: a plain transformers script: import torch and transformers, ``from_pretrained`` the
  same checkpoint (``experts_implementation`` and ``dtype`` set) and its tokenizer, then one
  ``model(input_ids, attention_mask, use_cache=False, logits_to_keep=1)`` per batch, under
  ``no_grad``, over the same batches the profile runs (the sequences ``moeprune`` tokenizes from the
  same files, sorted and padded as ``moeprune.data.batches`` does; the ids are handed over in a JSON
  file). Every experts implementation of transformers (``grouped_mm``, ``batched_mm``, ``eager``)
  in float32 and bfloat16 runs in the first round; the fastest (``--keep``, default 2) are kept for the
  other rounds, and the fastest by median counts. A setting ``dtype:experts:gc`` (``--stock``) is the
  stock script with the command's collector handling (paused over imports and load, everything
  frozen after the load and before exit): reported apart, as "stock +gc".
- **parts**: the command again, in a process that times its parts: importing torch and
  transformers (what the stock script imports), importing the CLI, then inside the call the
  functions it calls (config, records, model load, tokenization, calibration, router digest,
  profile build, write; each time excludes the timed calls inside it), the rest of the call, and
  the interpreter start and exit (process wall minus the time inside). It imports torch and
  transformers itself, with the collector on (as the stock script does), before the command runs.

Ratios: command / stock process (wall and CPU), and calibrate / the fastest stock forward (the
forward loop alone, in the stock process; both fresh processes). Models (``--models``): ``testbed``
(the packaged checkpoint, by path; data: the testbed's ``prose`` and ``python`` calibration files,
100 records, 14.6k tokens) and ``qwen3`` (a random Qwen3-MoE-like model, hidden 1024, 128 experts,
top-8, 2 MoE layers, saved in bfloat16 with a character-level tokenizer; 16 records of 512 tokens:
two batches of 8). Thread counts (``--threads``) set ``OMP_NUM_THREADS`` of every child.

    python benchmarks/bench_profile_cmd.py [--models testbed,qwen3] [--threads 2,1] [--repeats 3]
        [--base BASE/src]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

STOCK_SETTINGS = ",".join(
    f"{d}:{i}" for d in ("float32", "bfloat16") for i in ("grouped_mm", "batched_mm", "eager")
)

# A plain transformers forward over the batches in a JSON file; prints its own phase times.
STOCK = r"""
import gc, json, sys, time
t0 = time.perf_counter()
with_gc = sys.argv[5:] == ["gc"]  # the command's collector handling: paused over imports + load, frozen
if with_gc:
    gc.disable()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
path, batches_file, dtype, impl = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(
    path, dtype=getattr(torch, dtype), experts_implementation=impl
).eval()
tok = AutoTokenizer.from_pretrained(path)
if with_gc:
    gc.freeze()
    gc.enable()
t2 = time.perf_counter()
batches = json.loads(open(batches_file).read())
t3 = time.perf_counter()
with torch.no_grad():
    for ids, mask in batches:
        model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), use_cache=False, logits_to_keep=1)
t4 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "batches": t3 - t2, "forward": t4 - t3, "inside": t4 - t0}))
if with_gc:
    gc.freeze()
"""

# The profile command in-process, with the functions it calls timed (exclusive of nested timed calls).
PARTS = r"""
import json, sys, time
t0 = time.perf_counter()
times = {}
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
times["imports: torch, transformers"] = t1 - t0
import moeprune.cli as cli
cli._register_commands()
t2 = time.perf_counter()
times["imports: moeprune CLI"] = t2 - t1
from moeprune import calibrate, data, identity, modelio, profile
t3 = time.perf_counter()
times["imports: moeprune, the rest"] = t3 - t2
stack = []

def timed(label, fn):
    def run(*a, **k):
        start = time.perf_counter()
        stack.append(0.0)
        try:
            return fn(*a, **k)
        finally:
            took = time.perf_counter() - start
            inner = stack.pop()
            times[label] = times.get(label, 0.0) + took - inner
            if stack:
                stack[-1] += took
    return run

modelio.load_config = timed("config", modelio.load_config)
modelio.load_model = timed("load: model + tokenizer", modelio.load_model)
data.load_records = timed("records", data.load_records)
data.tokenize_records = timed("tokenize", data.tokenize_records)
calibrate.calibrate = timed("calibrate", calibrate.calibrate)
identity.model_router_digest = timed("router digest", identity.model_router_digest)
profile.Profile.build = staticmethod(timed("profile build", profile.Profile.build))
profile.Profile.save = timed("write", profile.Profile.save)
try:
    cli.run()  # the console script's entry point: main(sys.argv[1:]), then sys.exit
finally:
    t4 = time.perf_counter()
    call = t4 - t3
    times["call: the rest"] = call - sum(v for k, v in times.items() if not k.startswith("imports"))
    times["inside"] = t4 - t0
    print(json.dumps(times))
"""


def run_child(argv: list[str], env: dict[str, str], check: bool = True) -> tuple[float, float, str, str]:
    """Run a fresh process; (wall s, CPU s of the child, stdout, stderr); stdout "" when it failed
    and ``check`` is off."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 and not check:
        return wall, 0.0, "", proc.stderr.strip().splitlines()[-1][:200]
    if proc.returncode != 0:
        sys.exit(f"child failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout, proc.stderr


def run_command(
    src: Path, parts: bool = False, *, model: Path, data_args: list[str], out: Path, env: dict
) -> dict:
    """The profile command from the tree ``src`` (``parts``: in the timing harness), ``out`` removed first."""
    out.unlink(missing_ok=True)
    head = [sys.executable, "-c", PARTS] if parts else [sys.executable, "-m", "moeprune"]
    argv = [*head, "profile", str(model), *data_args, "--out", str(out)]
    wall, cpu, stdout, _ = run_child(argv, {**env, "PYTHONPATH": str(src)})
    row = {"wall": wall, "cpu": cpu}
    if parts:
        row.update(json.loads(stdout.strip().splitlines()[-1]))
    return row


def run_stock(setting: str, model: Path, batches_file: Path, env: dict) -> dict | None:
    """The stock script with ``setting`` = dtype:experts[:gc]; None when this setting cannot run
    here (batched_mm's memory on large models)."""
    argv = [sys.executable, "-c", STOCK, str(model), str(batches_file), *setting.split(":")]
    wall, cpu, stdout, err = run_child(argv, env, False)
    if not stdout:
        print(f"  stock {setting} failed: {err}", file=sys.stderr)
        return None
    return {"wall": wall, "cpu": cpu, **json.loads(stdout.strip().splitlines()[-1])}


def testbed_case(tmp: Path, n_records: int = 0) -> tuple[Path, list[Path]]:
    from moeprune.testbed import DATA_DIR, MODEL_DIR

    return MODEL_DIR, [DATA_DIR / "prose.calib.jsonl", DATA_DIR / "python.calib.jsonl"]


def qwen3_case(tmp: Path, n_records: int = 16) -> tuple[Path, list[Path]]:
    """A random Qwen3-MoE-like checkpoint (bf16 on disk, as Qwen3 is published) with a character
    tokenizer, and ``n_records`` records of 511 characters (512 tokens with BOS) from the testbed's prose."""
    import torch
    from transformers import AutoModelForCausalLM

    from _models import qwen3_config
    from moeprune.testbed import DATA_DIR
    from moeprune.testing.tiny import byte_tokenizer

    path = tmp / "qwen3"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen3_config(2), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    text = " ".join(
        json.loads(line)["text"] for line in (DATA_DIR / "prose.calib.jsonl").read_text().splitlines()
    )
    text = "".join(c for c in text if 32 <= ord(c) < 127)  # the tokenizer's alphabet: no <unk>
    records = [{"text": text[i * 511 : (i + 1) * 511]} for i in range(n_records)]
    data = tmp / "qwen3.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, [data]


CASES = {
    "testbed": ("testbed (hidden 128, 32 experts, top-4, 3 MoE layers)", testbed_case),
    "qwen3": ("Qwen3-MoE-like, random (hidden 1024, 128 experts, top-8, 2 MoE layers)", qwen3_case),
}


def profile_batches(model: Path, files: list[Path], out: Path) -> tuple[int, int]:
    """Write the batches `profile` runs with its defaults (as token ids and masks) to ``out``;
    returns (records, tokens)."""
    from moeprune.data import batches, load_records, pad_token_id, tokenize_records
    from moeprune.modelio import load_tokenizer

    tok = load_tokenizer(model)
    records, _files = load_records([str(f) for f in files], None)
    seqs, _kept = tokenize_records(tok, records, 2048)
    rows = [(b.input_ids.tolist(), b.attention_mask.tolist()) for b in batches(seqs, 8, pad_token_id(tok))]
    out.write_text(json.dumps(rows))
    return len(seqs), sum(len(s) for s in seqs)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="testbed,qwen3")
    ap.add_argument("--threads", default="2,1", help="comma-separated OMP_NUM_THREADS of the children")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds after the first (which picks the stock settings)"
    )
    ap.add_argument(
        "--stock", default=STOCK_SETTINGS, help="stock settings tried in the first round, dtype:experts,..."
    )
    ap.add_argument(
        "--keep", type=int, default=2, help="stock settings kept after the first round (the fastest)"
    )
    ap.add_argument(
        "--qwen3-records", type=int, default=16, help="records of 512 tokens for qwen3 (8 per batch)"
    )
    ap.add_argument(
        "--base", type=Path, default=None, help="a baseline tree's src/ to run the command from too"
    )
    args = ap.parse_args()
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    print(f"start: {uptime[0]}", file=sys.stderr)
    trees = {"this tree": SRC}
    if args.base is not None:
        trees["base"] = args.base.resolve()
    for src in trees.values():  # an installed package has its bytecode; PYTHONDONTWRITEBYTECODE is set here
        compileall.compile_dir(str(src), quiet=1)
    benches = str(ROOT / "benchmarks")
    tmp = Path(tempfile.mkdtemp(prefix="bench_profile_cmd_"))
    results = []
    for name in args.models.split(","):
        label, case = CASES[name]
        model, files = case(tmp, args.qwen3_records)
        batches_file = tmp / f"{name}.batches.json"
        n_rec, n_tok = profile_batches(model, files, batches_file)
        data_args = [a for f in files for a in ("--data", str(f))]
        for threads in [int(t) for t in args.threads.split(",")]:
            base_env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": f"{SRC}:{benches}"}
            out = tmp / f"{name}.profile.safetensors"

            cmd = partial(run_command, model=model, data_args=data_args, out=out, env=base_env)
            runs = {f"command ({t})": partial(cmd, src) for t, src in trees.items()}
            runs["parts (this tree)"] = partial(cmd, SRC, parts=True)
            for setting in args.stock.split(","):
                key = "stock " + setting.replace(":gc", " +gc").replace(":", " ")
                runs[key] = partial(run_stock, setting, model, batches_file, base_env)
            got: dict[str, list[dict]] = {k: [] for k in runs}
            print(f"{label}, {threads} thread(s): {n_rec} records, {n_tok} tokens", file=sys.stderr)
            for rnd in range(args.repeats + 1):
                names = list(runs)
                if rnd == 1:  # keep the fastest stock processes
                    stocks = sorted(
                        (k for k in runs if k.startswith("stock")), key=lambda k: got[k][0]["wall"]
                    )
                    for k in stocks[args.keep :]:
                        del runs[k]
                    names = list(runs)
                shift = rnd % len(names)
                for k in names[shift:] + names[:shift]:
                    row = runs[k]()
                    if row is None:
                        del runs[k], got[k]
                        continue
                    got[k].append(row)
                    print(
                        f"  [{rnd}] {k:28s} {row['wall']:6.2f} s wall {row['cpu']:6.2f} s cpu",
                        file=sys.stderr,
                    )
            # the first round only picks the stock settings; medians over the others (all, with no others)
            kept = {k: (v[1:] or v) for k, v in got.items() if k in runs}
            first = {k: v[0] for k, v in got.items() if k.startswith("stock")}
            results.append((label, threads, n_rec, n_tok, kept, first))
    shutil.rmtree(tmp, ignore_errors=True)
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"end: {uptime[1]}", file=sys.stderr)
    report(results, trees, args, uptime)


def report(results: list, trees: dict, args: argparse.Namespace, uptime: list[str]) -> None:
    cmd = (
        f"python benchmarks/bench_profile_cmd.py --models {args.models} --threads {args.threads} "
        f"--repeats {args.repeats} --keep {args.keep} --qwen3-records {args.qwen3_records}"
    )
    if args.stock != STOCK_SETTINGS:
        cmd += f" --stock {args.stock}"
    if args.base is not None:
        cmd += f" --base {args.base}"
    print(f"Command: `{cmd}`; uptime at start: {uptime[0]}; at end: {uptime[1]}\n")
    head = ["model, threads", "records / tokens", "fastest stock (dtype, experts)", "stock process"]
    for t in trees:
        head += [f"command ({t})", f"command / stock ({t}): wall, CPU"]
    head += ["fastest stock +gc", "command / stock +gc: wall, CPU"]
    head += ["fastest stock forward", "calibrate", "calibrate / stock forward: wall"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for label, threads, n_rec, n_tok, kept, _first in results:
        plain = [k for k in kept if k.startswith("stock") and not k.endswith("+gc")]
        fastest = min(plain, key=lambda k: med([r["wall"] for r in kept[k]]))
        s_wall, s_cpu = med([r["wall"] for r in kept[fastest]]), med([r["cpu"] for r in kept[fastest]])
        row = [
            f"{label.split(' (')[0]}, {threads}",
            f"{n_rec} / {n_tok}",
            fastest.removeprefix("stock "),
            f"{s_wall:.2f} s (CPU {s_cpu:.2f} s)",
        ]
        for t in trees:
            c = kept[f"command ({t})"]
            c_wall, c_cpu = med([r["wall"] for r in c]), med([r["cpu"] for r in c])
            row += [f"{c_wall:.2f} s (CPU {c_cpu:.2f} s)", f"**{c_wall / s_wall:.2f}**, {c_cpu / s_cpu:.2f}"]
        c = kept["command (this tree)"]
        c_wall, c_cpu = med([r["wall"] for r in c]), med([r["cpu"] for r in c])
        with_gc = [k for k in kept if k.endswith("+gc")]
        if with_gc:
            g = min(with_gc, key=lambda k: med([r["wall"] for r in kept[k]]))
            g_wall, g_cpu = med([r["wall"] for r in kept[g]]), med([r["cpu"] for r in kept[g]])
            row += [
                f"{g.removeprefix('stock ')}: {g_wall:.2f} s (CPU {g_cpu:.2f} s)",
                f"**{c_wall / g_wall:.2f}**, {c_cpu / g_cpu:.2f}",
            ]
        else:
            row += ["-", "-"]
        stocks = [k for k in kept if k.startswith("stock")]
        by_forward = min(stocks, key=lambda k: med([r["forward"] for r in kept[k]]))
        fwd = med([r["forward"] for r in kept[by_forward]])
        cal = med([r["calibrate"] for r in kept["parts (this tree)"]])
        row += [f"{by_forward.removeprefix('stock ')}: {fwd:.2f} s", f"{cal:.2f} s", f"**{cal / fwd:.2f}**"]
        print("| " + " | ".join(row) + " |")
    print(
        "\nWhere the time goes (medians, s): the command in parts (this tree) and the fastest stock process\n"
    )
    for label, threads, _n_rec, _n_tok, kept, first in results:
        stocks = [k for k in kept if k.startswith("stock")]
        plain = [k for k in stocks if not k.endswith("+gc")]
        fastest = min(plain, key=lambda k: med([r["wall"] for r in kept[k]]))
        parts = kept["parts (this tree)"]
        keys = [k for k in parts[0] if k not in ("wall", "cpu", "inside")]
        cells = [f"{k} {med([r.get(k, 0.0) for r in parts]):.3f}" for k in keys]
        cells.append(f"start + exit {med([r['wall'] - r['inside'] for r in parts]):.3f}")
        cells.append(f"process {med([r['wall'] for r in parts]):.2f}")
        st = kept[fastest]
        stock_cells = [
            f"{k} {med([r[k] for r in st]):.3f}" for k in ("imports", "load", "batches", "forward")
        ]
        stock_cells.append(f"start + exit {med([r['wall'] - r['inside'] for r in st]):.3f}")
        print(f"- {label.split(' (')[0]}, {threads} thread(s): command: " + ", ".join(cells))
        print(f"  stock ({fastest.removeprefix('stock ')}): " + ", ".join(stock_cells))
        others = ", ".join(
            f"{k.removeprefix('stock ')} {med([r['wall'] for r in kept[k]]):.2f} s (forward {med([r['forward'] for r in kept[k]]):.2f})"
            for k in stocks
        )
        print(f"  stock processes kept: {others}")
        every = ", ".join(
            f"{k.removeprefix('stock ')} {r['wall']:.2f} s (forward {r['forward']:.2f})"
            for k, r in first.items()
        )
        print(f"  first round, every stock setting: {every}")


if __name__ == "__main__":
    main()
