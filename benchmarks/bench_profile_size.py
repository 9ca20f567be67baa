"""Profile size against calibration tokens, and PreMoe's ranking from bounded vs exact profiles.

A default profile keeps PreMoe's statistics as per-layer histograms over q (size fixed by the
model), a ``--premoe-exact`` one also keeps every token's top-Ka entries (size grows with the
tokens). For each model: calibrate once with the exact entries, score PreMoe from the entries
and from the histograms alone, and report

1. the written file size of both kinds at several token counts (testbed: its calibration data of
   every domain, repeated; tiny random models: random token records);
2. ranking agreement between the two PreMoe scores: the smallest per-layer Spearman correlation,
   whether the kept sets at 25/50/75% keep are identical in every layer, and the largest score
   difference relative to the largest score, with r_l (the default) and with a fixed r = 0.3
   (a threshold inside the histogram's bins), on the testbed (each domain) and on tiny models of
   several architectures;
3. that the library's per-record keys (``records``) are the same from both.

    python benchmarks/bench_profile_size.py [--repeats 1 2 4] [--append docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

TINY_TYPES = ("deepseek_v3", "qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss")
KEEPS = (0.25, 0.5, 0.75)
PER_TOKEN = ("premoe_q", "premoe_f", "premoe_idx")


def build(model, seqs, blocks, exact: bool):
    from moeprune.calibrate import calibrate
    from moeprune.profile import Profile

    t = calibrate(model, seqs, blocks=blocks, batch_size=16, premoe_exact=exact)
    return Profile.build(t, model="bench", config=model.config, blocks=blocks, samples=len(seqs), data=[], settings={})


def without_entries(prof):
    from moeprune.profile import Profile

    tensors = {k: v for k, v in prof.tensors.items() if k not in PER_TOKEN}
    return Profile(meta=prof.meta, tensors=tensors)


def file_size(prof) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.profile.safetensors"
        prof.save(path)
        return path.stat().st_size


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra @ rb) / den) if den else 1.0


def agreement(exact: torch.Tensor, bounded: torch.Tensor) -> dict[str, str]:
    E = exact.shape[1]
    rho = min(spearman(exact[li], bounded[li]) for li in range(exact.shape[0]))
    same = []
    for keep in KEEPS:
        m = max(1, round(keep * E))
        ok = all(
            set(exact[li].topk(m).indices.tolist()) == set(bounded[li].topk(m).indices.tolist())
            for li in range(exact.shape[0])
        )
        same.append("yes" if ok else "NO")
    rel = float((exact - bounded).abs().max() / exact.abs().max().clamp_min(1e-300))
    return {"spearman_min": f"{rho:.6f}", "same_kept": "/".join(same), "max_rel_diff": f"{rel:.1e}"}


def compare(prof) -> list[dict[str, str]]:
    from moeprune.library import task_keys
    from moeprune.score import score_premoe

    bounded = without_entries(prof)
    rows = []
    for r in (None, 0.3):
        row = agreement(score_premoe(prof, r=r), score_premoe(bounded, r=r))
        row["r"] = "r_l" if r is None else str(r)
        rows.append(row)
    ka = prof.premoe_ka
    k_ex, k_bd = task_keys(prof, ka)["records"], task_keys(bounded, ka)["records"]
    rows[0]["records_key_diff"] = f"{float((k_ex - k_bd).abs().max()):.1e}"
    return rows


def testbed_seqs(domains=None):
    from transformers import AutoTokenizer

    from moeprune.data import load_records, tokenize_records
    from moeprune.testbed import DOMAINS, data_file, testbed_path

    tok = AutoTokenizer.from_pretrained(testbed_path())
    out = {}
    for d in domains or DOMAINS:
        records, _ = load_records([str(data_file(d, "calib"))], None)
        out[d], _ = tokenize_records(tok, records, 256)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, nargs="+", default=[1, 2, 4], help="testbed data repeats for sizes")
    ap.add_argument("--tiny-records", type=int, default=300)
    ap.add_argument("--append", type=Path, default=None, help="append the tables to this markdown file")
    args = ap.parse_args()

    import moeprune.testing.tiny as tiny
    from moeprune.arch import find_moe_blocks
    from moeprune.modelio import load_model
    from moeprune.testbed import testbed_path

    torch.manual_seed(0)
    model, _ = load_model(str(testbed_path()), dtype="float32", device="cpu")
    blocks = find_moe_blocks(model)
    per_domain = testbed_seqs()
    every = [s for seqs in per_domain.values() for s in seqs]

    size_rows = []
    for n in args.repeats:
        seqs = every * n
        prof = build(model, seqs, blocks, exact=True)
        exact, bounded = file_size(prof), file_size(without_entries(prof))
        size_rows.append(("testbed", prof.tokens, exact, bounded))
    g = torch.Generator().manual_seed(0)
    tiny_model = tiny.tiny_model("qwen3_moe")
    tblocks = find_moe_blocks(tiny_model)
    for n in (100, 400, 1600):
        lengths = torch.randint(8, 128, (n,), generator=g).tolist()
        seqs = [torch.randint(4, 256, (k,), generator=g).tolist() for k in lengths]
        prof = build(tiny_model, seqs, tblocks, exact=True)
        size_rows.append(("tiny qwen3_moe", prof.tokens, file_size(prof), file_size(without_entries(prof))))

    agree_rows = []
    for domain, seqs in per_domain.items():
        for row in compare(build(model, seqs, blocks, exact=True)):
            agree_rows.append((f"testbed {domain}", row))
    for mt in TINY_TYPES:
        try:
            m = tiny.tiny_model(mt)
        except Exception as exc:  # noqa: BLE001 - a type this transformers cannot build: say so, go on
            print(f"skip {mt}: {exc.__class__.__name__}", file=sys.stderr)
            continue
        mb = find_moe_blocks(m)
        lengths = torch.randint(8, 128, (args.tiny_records,), generator=g).tolist()
        seqs = [torch.randint(4, int(m.config.get_text_config().vocab_size), (k,), generator=g).tolist() for k in lengths]
        for row in compare(build(m, seqs, mb, exact=True)):
            agree_rows.append((f"tiny {mt}", row))

    lines = ["| model | tokens | exact (bytes) | bounded (bytes) | exact / bounded |", "|---|---:|---:|---:|---:|"]
    for name, tokens, ex, bd in size_rows:
        lines.append(f"| {name} | {tokens:,} | {ex:,} | {bd:,} | {ex / bd:.2f} |")
    sizes = "\n".join(lines)
    lines = [
        "| model | threshold | min Spearman | same kept 25/50/75% | max rel. diff | records key diff |",
        "|---|---|---:|---|---:|---:|",
    ]
    for name, row in agree_rows:
        lines.append(
            f"| {name} | {row['r']} | {row['spearman_min']} | {row['same_kept']} | {row['max_rel_diff']} | "
            f"{row.get('records_key_diff', '')} |"
        )
    agree = "\n".join(lines)
    print(sizes)
    print()
    print(agree)
    if args.append is not None:
        from _models import append_section

        append_section(
            args.append,
            "Profile size: bounded PreMoe statistics vs per-token entries",
            "python benchmarks/bench_profile_size.py",
            "float32 CPU",
            "Goal: a default profile's size independent of the token count, with PreMoe's ranking unchanged.",
            sizes + "\n\n" + agree,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
