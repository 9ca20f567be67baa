#!/usr/bin/env python
"""Build the moeprune testbed: corpus, tokenizer, a small trained DeepSeek-V3 MoE, data files.

    python scripts/train_testbed.py                 # full run (about 30 min on 2 shared CPU cores)
    python scripts/train_testbed.py --quick --out /tmp/tb   # smoke run (seconds)

Everything is seeded: the default invocation (CPU, 1 thread) reproduces the packaged
checkpoint in ``src/moeprune/testbed/model`` and the data in ``src/moeprune/testbed/data``.
Float reductions depend on the thread count / CPU, so other settings reproduce it only
approximately.  See :mod:`moeprune.testbed.corpus` for domains, sources and the evaluation
protocol, which :func:`exact_match` and :func:`perplexity` below implement.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from moeprune.testbed import corpus  # noqa: E402

SEED = 1234
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

DEFAULTS = dict(
    vocab_size=2048,
    seq_len=128,
    batch_size=8,
    steps=3000,
    lr=3e-3,
    min_lr_ratio=0.1,
    warmup=50,
    weight_decay=0.1,
    bias_update_rate=1e-3,
    # 1 thread: on the shared 2-core machine 2 OpenMP threads were 10-20x slower per step whenever
    # other processes ran (spin-waiting threads); uncontended, 2 threads are ~1.8x faster.
    threads=1,
    eval_every=200,  # exact-match probe on 40 calibration prompts per task (does not affect training)
    experts_implementation="eager",  # fastest on CPU: eager 0.59 s/step, grouped_mm 6.0, batched_mm 16.5
    # fraction of training sequences per source; task sequences pack examples of all tasks
    mix={"tasks": 0.7, "python": 0.18, "prose": 0.12},
    task_mix={"numbers": 0.40, "reverse": 0.30, "dates": 0.30},
    n_task_train=60000,
    model=dict(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
)

QUICK = dict(
    vocab_size=512, seq_len=64, batch_size=4, steps=6, warmup=2, n_task_train=300, eval_every=0,
    model=dict(DEFAULTS["model"], num_hidden_layers=4, hidden_size=64, intermediate_size=64,
               moe_intermediate_size=16, kv_lora_rank=16, v_head_dim=16),
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256
    )


# ---------------------------------------------------------------------------
# training data
# ---------------------------------------------------------------------------


class Batcher:
    """Seeded stream of (input_ids, labels) batches mixing all domains.

    Task sequences pack ``[bos] prompt answer \\n [eos]`` examples of randomly drawn tasks
    (loss on answer, newline and EOS only); text sequences are ``[bos]`` + a window of a
    training document starting at a random line (loss on every text token).
    """

    def __init__(self, tok, task_train: dict[str, list[dict]], cfg: dict, seed: int):
        self.tok, self.cfg = tok, cfg
        self.rng = random.Random(seed)
        self.L = cfg["seq_len"]
        self.bos, self.eos, self.pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        # pre-tokenize task examples: (prompt ids incl. BOS, answer ids + newline + EOS)
        self.tasks = list(cfg["task_mix"])
        self.task_w = [cfg["task_mix"][t] for t in self.tasks]
        self.task_ex: dict[str, list[tuple[list[int], list[int]]]] = {}
        for t, recs in task_train.items():
            p = tok([r["prompt"] for r in recs])["input_ids"]
            a = tok([r["answer"] + "\n" for r in recs], add_special_tokens=False)["input_ids"]
            self.task_ex[t] = [(pi, ai + [self.eos]) for pi, ai in zip(p, a, strict=True)]
        self.task_pos = {t: 0 for t in self.tasks}
        for t in self.tasks:
            self.rng.shuffle(self.task_ex[t])
        # text documents of the train split, with their line starts
        self.docs: dict[str, list[tuple[str, list[int]]]] = {}
        for d in corpus.TEXT_DOMAINS:
            docs = []
            for name, text in corpus.text_documents(d):
                if corpus.document_split(name) != "train":
                    continue
                text = "\n".join(corpus._clean_lines(text))
                starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
                starts = [s for s in starts if text[s : s + 1].strip() or text[s : s + 4] == "    "]
                docs.append((text, starts))
            self.docs[d] = docs
        self.doc_w = {d: [len(t) for t, _ in docs] for d, docs in self.docs.items()}
        self.sources = list(cfg["mix"])
        self.source_w = [cfg["mix"][s] for s in self.sources]

    def _next_task_example(self, task: str):
        i = self.task_pos[task]
        ex = self.task_ex[task]
        if i >= len(ex):  # new epoch over the training examples
            self.rng.shuffle(ex)
            i = 0
        self.task_pos[task] = i + 1
        return ex[i]

    def _task_sequence(self):
        ids: list[int] = []
        lab: list[int] = []
        while True:
            t = self.rng.choices(self.tasks, self.task_w)[0]
            p, a = self._next_task_example(t)
            if len(ids) + len(p) + len(a) > self.L:
                break
            ids += p + a
            lab += [-100] * len(p) + a
        return ids, lab

    def _text_sequence(self, domain: str):
        text, starts = self.rng.choices(self.docs[domain], self.doc_w[domain])[0]
        s = self.rng.choice(starts)
        piece = text[s : s + 6 * self.L]
        ids = self.tok(piece, truncation=True, max_length=self.L)["input_ids"]
        return ids, [-100] + ids[1:]

    def next_batch(self):
        seqs = []
        for _ in range(self.cfg["batch_size"]):
            src = self.rng.choices(self.sources, self.source_w)[0]
            seqs.append(self._task_sequence() if src == "tasks" else self._text_sequence(src))
        ids = torch.full((len(seqs), self.L), self.pad, dtype=torch.long)
        lab = torch.full((len(seqs), self.L), -100, dtype=torch.long)
        for i, (x, y) in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            lab[i, : len(y)] = torch.tensor(y)
        return ids, lab


# ---------------------------------------------------------------------------
# routing statistics (also drives the auxiliary-loss-free balancing)
# ---------------------------------------------------------------------------


class RouterTap:
    """Records the top-k expert indices chosen by every DeepseekV3TopkRouter."""

    def __init__(self, model):
        self.gates = []
        for name, mod in model.named_modules():
            if type(mod).__name__ == "DeepseekV3TopkRouter":
                self.gates.append((name, mod))
        self.indices: list[torch.Tensor | None] = [None] * len(self.gates)
        self.handles = [mod.register_forward_hook(self._hook(i)) for i, (_, mod) in enumerate(self.gates)]

    def _hook(self, i):
        def hook(_mod, _inp, out):
            self.indices[i] = out[2].detach()

        return hook

    def counts(self, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[n_moe_layers, n_experts] number of (token, slot) assignments of the last forward."""
        rows = []
        for (_, mod), idx in zip(self.gates, self.indices, strict=True):
            if token_mask is not None:
                idx = idx[token_mask.reshape(-1)]
            rows.append(torch.bincount(idx.reshape(-1), minlength=mod.num_experts).float())
        return torch.stack(rows)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing: b_i += u * sign(mean_load - load_i)."""
        for (_, mod), load in zip(self.gates, counts, strict=True):
            mod.e_score_correction_bias += rate * torch.sign(load.mean() - load)

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------
# evaluation (the protocol of corpus.py)
# ---------------------------------------------------------------------------


@torch.no_grad()
def exact_match(model, tok, records: list[dict], max_new_tokens: int = 24) -> tuple[float, list[dict]]:
    """Greedy exact-match accuracy; prompts of equal token length are batched (no padding)."""
    model.eval()
    enc = [tok(r["prompt"])["input_ids"] for r in records]
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(enc):
        groups.setdefault(len(e), []).append(i)
    preds: list[str] = [""] * len(records)
    for _, idxs in sorted(groups.items()):
        for b in range(0, len(idxs), 64):
            chunk = idxs[b : b + 64]
            ids = torch.tensor([enc[i] for i in chunk])
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1)
            gen: list[list[int]] = [[] for _ in chunk]
            done = [False] * len(chunk)
            for _step in range(max_new_tokens):
                for j, t in enumerate(nxt.tolist()):
                    if done[j]:
                        continue
                    if t == tok.eos_token_id:
                        done[j] = True
                        continue
                    gen[j].append(t)
                    if "\n" in tok.decode(gen[j]):
                        done[j] = True
                if all(done):
                    break
                out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1)
            for j, i in enumerate(chunk):
                preds[i] = tok.decode(gen[j]).split("\n")[0].strip()
    correct = [p == r["answer"].strip() for p, r in zip(preds, records, strict=True)]
    wrong = [
        {"prompt": r["prompt"], "answer": r["answer"], "prediction": p}
        for p, r, c in zip(preds, records, correct, strict=True)
        if not c
    ]
    return sum(correct) / len(records), wrong


@torch.no_grad()
def perplexity(model, tok, records: list[dict], batch_size: int = 16) -> tuple[float, int]:
    model.eval()
    total_nll, total_tok = 0.0, 0
    encs = [tok(r["text"])["input_ids"] for r in records]
    for b in range(0, len(encs), batch_size):
        chunk = encs[b : b + batch_size]
        L = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), L), tok.pad_token_id)
        for i, e in enumerate(chunk):
            ids[i, : len(e)] = torch.tensor(e)
        logits = model(input_ids=ids).logits.float()
        labels = ids.clone()
        for i, e in enumerate(chunk):
            labels[i, len(e) :] = -100
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += nll.item()
        total_tok += int((labels[:, 1:] != -100).sum())
    return math.exp(total_nll / total_tok), total_tok


def domain_sequences(tok, domain: str, records: list[dict]) -> list[list[int]]:
    if "text" in records[0]:
        return [tok(r["text"])["input_ids"] for r in records]
    return [
        tok(r["prompt"])["input_ids"]
        + tok(r["answer"] + "\n", add_special_tokens=False)["input_ids"]
        + [tok.eos_token_id]
        for r in records
    ]


@torch.no_grad()
def routing_counts(model, tap: RouterTap, tok, seqs: list[list[int]]) -> torch.Tensor:
    model.eval()
    total = None
    for b in range(0, len(seqs), 16):
        chunk = seqs[b : b + 16]
        L = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), L), tok.pad_token_id)
        mask = torch.zeros((len(chunk), L), dtype=torch.bool)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        model(input_ids=ids)
        c = tap.counts(mask)
        total = c if total is None else total + c
    return total


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint supports)."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * (a[nz] / b[nz]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def specialisation(model, tap, tok, splits: dict[str, dict[str, list[dict]]]) -> dict:
    """Per-layer comparison of the domains' expert-usage histograms on held-out data."""
    counts, halves = {}, {}
    for d, sp in splits.items():
        seqs = domain_sequences(tok, d, sp["eval"])
        counts[d] = routing_counts(model, tap, tok, seqs)
        halves[d] = (
            routing_counts(model, tap, tok, seqs[0::2]),
            routing_counts(model, tap, tok, seqs[1::2]),
        )
    doms = list(splits)
    n_layers, n_exp = counts[doms[0]].shape
    first_moe = model.config.first_k_dense_replace
    layers = []
    for li in range(n_layers):
        pair = {}
        for i, a in enumerate(doms):
            for b in doms[i + 1 :]:
                pair[f"{a}|{b}"] = round(js_divergence(counts[a][li], counts[b][li]), 4)
        within = {d: round(js_divergence(halves[d][0][li], halves[d][1][li]), 4) for d in doms}
        per_dom = {}
        for d in doms:
            p = counts[d][li] / counts[d][li].sum()
            srt = p.sort(descending=True).values
            per_dom[d] = {
                "experts_for_80pct_mass": int((srt.cumsum(0) < 0.8).sum()) + 1,
                "experts_for_95pct_mass": int((srt.cumsum(0) < 0.95).sum()) + 1,
                "experts_used_lt_0.5pct": int((p < 0.005).sum()),
                "top8": p.argsort(descending=True)[:8].tolist(),
            }
        allc = sum(counts[d][li] / counts[d][li].sum() for d in doms)
        layers.append(
            {
                "layer": first_moe + li,
                "js_bits_between_domains": pair,
                "js_bits_between_domains_mean": round(sum(pair.values()) / len(pair), 4),
                "js_bits_between_domains_min": min(pair.values()),
                "js_bits_within_domain_split_half": within,
                "per_domain": per_dom,
                "pooled_max_over_mean_load": round(float(allc.max() / allc.mean()), 3),
                "histograms": {d: counts[d][li].int().tolist() for d in doms},
            }
        )
    return {
        "metric": "Jensen-Shannon divergence (bits, 0..1) between per-domain expert-usage histograms "
        "(top-k assignment counts over all tokens of the held-out eval records); the within-domain "
        "split-half value is the noise floor",
        "n_experts": n_exp,
        "layers": layers,
    }


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def build_model(cfg: dict, tok):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    mc = dict(cfg["model"])
    config = DeepseekV3Config(
        vocab_size=len(tok),
        **mc,
        hidden_act="silu",
        rope_interleave=True,
        num_mtp_layers=0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        attention_dropout=0.0,
        # DeepSeek-V3's hub routing fields: transformers always routes V3 this way, but readers
        # such as llama.cpp's convert_hf_to_gguf.py fall back to softmax gating without them
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        moe_layer_freq=1,
        ep_size=1,
    )
    torch.manual_seed(cfg["seed"])
    model = DeepseekV3ForCausalLM(config)
    return model


def lr_at(step: int, cfg: dict) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    frac = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
    m = cfg["min_lr_ratio"]
    return cfg["lr"] * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * frac)))


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds); requires --out")
    ap.add_argument("--out", type=Path, help="model output dir (default: the packaged testbed/model)")
    ap.add_argument(
        "--data-out", type=Path, help="data output dir (default: testbed/data, or OUT/data with --out)"
    )
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--experts-implementation", choices=["eager", "batched_mm", "grouped_mm"])
    ap.add_argument(
        "--bench", action="store_true", help="time a few steps of each experts implementation and exit"
    )
    ap.add_argument("--set", action="append", help="override a setting, KEY=JSON (development aid)")
    args = ap.parse_args(argv)

    cfg = json.loads(json.dumps(DEFAULTS))
    cfg["seed"] = SEED
    if args.quick:
        if args.out is None:
            ap.error("--quick requires --out")
        cfg.update(json.loads(json.dumps(QUICK)))
    if args.set:
        for kv in args.set:
            k, v = kv.split("=", 1)
            cfg[k] = json.loads(v)
    for k in ("steps", "threads", "experts_implementation"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    pkg = REPO / "src" / "moeprune" / "testbed"
    out = args.out or pkg / "model"
    data_out = args.data_out or (out / "data" if args.out else pkg / "data")

    t_start = time.time()
    torch.set_num_threads(cfg["threads"])
    random.seed(SEED)
    torch.manual_seed(SEED)

    # ---- corpus -----------------------------------------------------------------
    log("building corpus")
    n_eval_task = 8 if args.quick else corpus.N_TASK_EVAL
    n_eval_text = 8 if args.quick else corpus.N_TEXT_EVAL
    task_splits = {t: corpus.task_splits(t, cfg["n_task_train"]) for t in corpus.TASKS}
    text_splits = {d: corpus.text_splits(d) for d in corpus.TEXT_DOMAINS}
    for t, sp in task_splits.items():
        ev, ca, tr = ({r["prompt"] for r in sp[k]} for k in ("eval", "calib", "train"))
        assert not (ev & ca) and not (ev & tr) and not (ca & tr), f"{t}: split overlap"
    for d, sp in text_splits.items():
        ev, ca = ({r["text"] for r in sp[k]} for k in ("eval", "calib"))
        assert not (ev & ca), f"{d}: split overlap"

    # ---- tokenizer --------------------------------------------------------------
    log("training tokenizer")
    tok_texts: list[str] = []
    for d in corpus.TEXT_DOMAINS:
        tok_texts += corpus.text_chunks(d, "train", 2000)
    for t in corpus.TASKS:
        tok_texts += [corpus.format_example(r) for r in task_splits[t]["train"][:5000]]
    tok = train_tokenizer(tok_texts, cfg["vocab_size"])
    assert tok("Number 12 in English: ")["input_ids"][0] == tok.bos_token_id

    # ---- model --------------------------------------------------------------------
    model = build_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    batcher = Batcher(tok, {t: sp["train"] for t, sp in task_splits.items()}, cfg, seed=SEED)
    tap = RouterTap(model)

    if args.bench:
        for impl in ("eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(impl)
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            times = []
            for i in range(6):
                ids, lab = batcher.next_batch()
                t0 = time.time()
                loss = model(input_ids=ids, labels=lab).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times.append(time.time() - t0)
            log(f"{impl}: {sum(times) / len(times):.3f} s/step")
        return 0

    model.set_experts_implementation(cfg["experts_implementation"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"],
        betas=(0.9, 0.95),
    )

    # ---- training -----------------------------------------------------------------
    log(f"training {cfg['steps']} steps, batch {cfg['batch_size']}x{cfg['seq_len']}")
    curve = []
    t_train = time.time()
    window_loss, window_n = 0.0, 0
    probe = {t: sp["calib"][:40] for t, sp in task_splits.items()}
    for step in range(cfg["steps"]):
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ids, lab = batcher.next_batch()
        loss = model(input_ids=ids, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tap.update_bias(tap.counts(ids != tok.pad_token_id), cfg["bias_update_rate"])
        window_loss += loss.item()
        window_n += 1
        if (step + 1) % 50 == 0 or step + 1 == cfg["steps"]:
            load = tap.counts(ids != tok.pad_token_id)
            imb = (load.max(1).values / load.mean(1)).mean().item()
            rec = {
                "step": step + 1,
                "loss": round(window_loss / window_n, 4),
                "lr": round(lr_at(step, cfg), 6),
                "max_over_mean_load": round(imb, 3),
                "elapsed_s": round(time.time() - t_train, 1),
            }
            if cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0:
                probe_res = {t: exact_match(model, tok, r) for t, r in probe.items()}
                rec["probe_acc"] = {t: acc for t, (acc, _) in probe_res.items()}
                rec["probe_wrong"] = {
                    t: [w["prediction"] for w in wr[:2]] for t, (_, wr) in probe_res.items()
                }
            curve.append(rec)
            log(json.dumps(rec))
            window_loss, window_n = 0.0, 0
    train_s = time.time() - t_train

    # ---- evaluation -----------------------------------------------------------------
    model.eval()
    log("evaluating")
    results: dict[str, dict] = {}
    for t, sp in task_splits.items():
        acc, wrong = exact_match(model, tok, sp["eval"][:n_eval_task])
        cacc, _ = exact_match(model, tok, sp["calib"][:n_eval_task])
        results[t] = {
            "metric": "exact_match",
            "eval_accuracy": round(acc, 4),
            "calib_accuracy": round(cacc, 4),
            "n_eval": min(n_eval_task, len(sp["eval"])),
            "wrong_examples": wrong[:5],
        }
        log(f"{t}: exact match {acc:.3f} (calib {cacc:.3f})")
    for d, sp in text_splits.items():
        ppl, ntok = perplexity(model, tok, sp["eval"][:n_eval_text])
        cppl, _ = perplexity(model, tok, sp["calib"][:n_eval_text])
        lens = [len(tok(r["text"])["input_ids"]) - 1 for r in sp["eval"][:n_eval_text]]
        results[d] = {
            "metric": "perplexity",
            "eval_perplexity": round(ppl, 3),
            "calib_perplexity": round(cppl, 3),
            "eval_tokens": ntok,
            "eval_record_tokens_min_mean_max": [min(lens), round(sum(lens) / len(lens), 1), max(lens)],
        }
        log(f"{d}: perplexity {ppl:.2f} (calib {cppl:.2f}), {ntok} tokens")
    n_spec = {**{t: n_eval_task for t in task_splits}, **{d: n_eval_text for d in text_splits}}
    spec = specialisation(
        model,
        tap,
        tok,
        {d: {"eval": sp["eval"][: n_spec[d]]} for d, sp in {**task_splits, **text_splits}.items()},
    )
    for lay in spec["layers"]:
        within = sum(lay["js_bits_within_domain_split_half"].values()) / len(corpus.DOMAINS)
        log(
            f"layer {lay['layer']}: JS between domains mean {lay['js_bits_between_domains_mean']:.3f} "
            f"min {lay['js_bits_between_domains_min']:.3f} (within-domain split-half {within:.3f})"
        )
    tap.remove()

    # ---- write ------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    data_out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file() and f.name != ".gitkeep":
            f.unlink()
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=24,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for t, sp in task_splits.items():
        write_jsonl(data_out / f"{t}.calib.jsonl", sp["calib"])
        write_jsonl(data_out / f"{t}.eval.jsonl", sp["eval"])
    for d, sp in text_splits.items():
        write_jsonl(data_out / f"{d}.calib.jsonl", sp["calib"])
        write_jsonl(data_out / f"{d}.eval.jsonl", sp["eval"])

    wall = time.time() - t_start
    cfg_log = {k: v for k, v in cfg.items()}
    training_log = {
        "description": "moeprune testbed MoE (DeepseekV3ForCausalLM) trained by scripts/train_testbed.py",
        "command": " ".join(
            ["python", "scripts/train_testbed.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "settings": cfg_log,
        "seeds": {
            "model_init_and_batches": SEED,
            "task_eval": corpus.EVAL_SEED,
            "task_calib": corpus.CALIB_SEED,
            "task_train": corpus.TRAIN_SEED,
        },
        "parameters": n_params,
        "active_parameters_per_token": active_params(model),
        "domains": {
            "tasks": list(corpus.TASKS),
            "text": list(corpus.TEXT_DOMAINS),
            "sources": {
                "numbers": "synthetic (corpus.make_numbers)",
                "reverse": "synthetic (corpus.make_reverse)",
                "dates": "synthetic (corpus.make_dates)",
                "python": "CPython standard library top-level *.py modules (sysconfig stdlib dir)",
                "prose": "CPython pydoc_data/topics.py help texts (language reference prose)",
            },
        },
        "results": results,
        "training_curve": curve,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(wall, 1),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "threads": cfg["threads"],
            "machine": platform.machine(),
            "note": "CPU float reductions depend on thread count and CPU; other settings reproduce "
            "the checkpoint only approximately (metrics within noise)",
        },
        "specialisation": spec,
    }
    (out / "training_log.json").write_text(json.dumps(training_log, indent=1) + "\n")
    log(f"wrote {out} and {data_out}; wall {wall:.0f}s")
    return 0


def active_params(model) -> int:
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    n_moe = c.num_hidden_layers - c.first_k_dense_replace
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    return total - n_moe * (c.n_routed_experts - c.num_experts_per_tok) * per_expert


if __name__ == "__main__":
    sys.exit(main())
