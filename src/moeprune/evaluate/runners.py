"""The three evaluators (perplexity, exact-match generation, multiple-choice log-likelihood) and
:func:`evaluate`, which runs a list of tasks on an already-loaded model.

Protocols (the testbed training script evaluates the same way):

* Tokenization uses the tokenizer's own special tokens (``tokenizer(text)``: BOS when the tokenizer
  adds one); an EOS that a tokenizer appends is dropped.
* Perplexity: each document is truncated to ``max_length`` tokens, documents are batched with right
  padding; the mean NLL of every predicted non-padding token over the whole task (token-weighted)
  is reported with ``perplexity = exp(nll)``.
* Exact match: greedy decoding, batched with left padding, an attention mask and explicit position
  ids; a sequence stops at EOS, as soon as its decoded continuation contains a newline, or after
  ``max_new_tokens``. The prediction is the decoded continuation (special tokens skipped) up to the
  first newline, stripped; correct iff it equals ``answer.strip()``.
* Multiple choice: each choice is scored by the summed log-probability of its tokens after the
  prompt (``tokens(prompt + choice)[len(tokens(prompt)):]``, trailing whitespace of the prompt moved
  into the choice as lm-evaluation-harness does); ``acc`` takes the argmax of that sum and
  ``acc_norm`` of the sum divided by the choice's length in characters.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moeprune.errors import UserError
from moeprune.evaluate.options import check_run_options
from moeprune.evaluate.tasks import EXACT_MATCH, MULTIPLE_CHOICE, PERPLEXITY, Task, parse_task_spec
from moeprune.load import aux_loss_off

__all__ = [
    "evaluate",
    "run_exact_match",
    "run_multiple_choice",
    "run_perplexity",
]

Advance = Callable[[int], None]


def _noop(_n: int) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# helpers


def encode(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text)`` with the tokenizer's special tokens, minus an appended EOS."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not plain or plain[-1] != eos:
            ids = ids[:-1]
    return ids


def pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation-config EOS."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(t) for t in extra)
    return ids


def input_device(model: Any) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _accepts_position_ids(model: Any) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model: Any) -> str:
    """The forward's name for the KV cache: ``cache`` since transformers 5.25 (which warns on, and
    will drop, the older ``past_key_values``), ``past_key_values`` before."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _longest_first(lengths: Sequence[int], batch_size: int, advance: Advance) -> Iterator[list[int]]:
    """Indices ``0..len(lengths)-1`` in batches of ``batch_size``, longest first, so that a batch
    holds similar lengths (little padding) and the widest batch runs first (running out of memory
    shows at once). ``advance`` gets each batch's size once the caller is done with it."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        yield batch
        advance(len(batch))


def _right_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _padded_logits(
    model: Any, rows: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, logits) of one right-padded batch; no KV cache, as nothing is generated."""
    ids, mask = _right_padded(rows, pad, device)
    with aux_loss_off(model):
        return ids, model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _stderr(p: float, n: int) -> float | None:
    """Standard error of a proportion, sqrt(p(1-p)/(n-1)); ``None`` for a single record."""
    if n < 2:
        return None
    return math.sqrt(p * (1.0 - p) / (n - 1))


# ---------------------------------------------------------------------------------------------
# perplexity


@torch.no_grad()
def run_perplexity(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    advance: Advance = _noop,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Token-weighted perplexity over all documents; padding never counts."""
    device = input_device(model)
    pad = pad_id(tokenizer)
    encs = [encode(tokenizer, r["text"])[:max_length] for r in records]
    doc_nll = [0.0] * len(encs)
    doc_tokens = [max(len(e) - 1, 0) for e in encs]
    for batch in _longest_first([len(e) for e in encs], batch_size, advance):
        idx = [i for i in batch if len(encs[i]) >= 2]  # a single token predicts nothing
        if idx:
            ids, logits = _padded_logits(model, [encs[i] for i in idx], pad, device)
            for j, i in enumerate(idx):
                n = len(encs[i])
                targets = ids[j, 1:n].to(logits.device)
                nll = F.cross_entropy(logits[j, : n - 1].float(), targets, reduction="none")
                doc_nll[i] = float(nll.double().sum())
            del logits  # free it before the next batch's forward pass
    total_tokens = sum(doc_tokens)
    if total_tokens == 0:
        raise UserError(
            "perplexity task has no token to predict (every document is shorter than two tokens)",
            "give it longer documents",
        )
    nll = math.fsum(doc_nll) / total_tokens
    out: dict[str, Any] = {
        "n": len(records),
        "metrics": {
            "perplexity": math.exp(nll) if nll < 700 else math.inf,
            "nll": nll,
            "tokens": total_tokens,
        },
    }
    if log_samples:
        out["samples"] = [{"nll_sum": s, "tokens": t} for s, t in zip(doc_nll, doc_tokens, strict=True)]
    return out


# ---------------------------------------------------------------------------------------------
# exact match


@torch.no_grad()
def greedy_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 24,
    stop_ids: set[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations of a batch of tokenized prompts (left padding, attention mask, position ids).

    A row stops at a token in ``stop_ids`` (not included), once its decoded continuation contains
    a newline, or after ``max_new_tokens`` tokens.
    """
    device = input_device(model)
    pad = pad_id(tokenizer)
    stop = stop_ids if stop_ids is not None else eos_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    n = len(prompts)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[j, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    use_pos = _accepts_position_ids(model)
    cache_kwarg = _cache_kwarg(model)
    with aux_loss_off(model):
        return _decode(model, tokenizer, ids, mask, position, use_pos, cache_kwarg, max_new_tokens, stop)


def _decode(
    model: Any,
    tokenizer: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    position: torch.Tensor,
    use_pos: bool,
    cache_kwarg: str,
    max_new_tokens: int,
    stop: set[int],
) -> list[list[int]]:
    """greedy_generate's loop: one forward per new token, reusing the KV cache when the model keeps one."""
    n = ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    past = None
    step_ids, step_pos = ids, position
    for _step in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask, "use_cache": True}
        if past is not None:
            kwargs[cache_kwarg] = past
        if use_pos:
            kwargs["position_ids"] = step_pos
        out = model(**kwargs)
        past = out.get(cache_kwarg)
        nxt = out.logits[:, -1, :].argmax(-1)
        for j, tok in enumerate(nxt.tolist()):
            if done[j]:
                continue
            if tok in stop:
                done[j] = True
                continue
            generated[j].append(tok)
            if "\n" in tokenizer.decode(generated[j], skip_special_tokens=True):
                done[j] = True
        if all(done):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        ids = torch.cat([ids, nxt[:, None].to(ids.device)], dim=1)
        position = torch.cat([position, position[:, -1:] + 1], dim=1)
        if past is not None:
            step_ids, step_pos = ids[:, -1:], position[:, -1:]
        else:  # a model that keeps no cache: feed the whole sequence again
            step_ids, step_pos = ids, position
    return generated


def prediction_text(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).split("\n")[0].strip()


@torch.no_grad()
def run_exact_match(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    advance: Advance = _noop,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Greedy exact-match accuracy with its standard error."""
    encs = [encode(tokenizer, r["prompt"]) for r in records]
    for i, e in enumerate(encs):
        if not e:
            raise UserError(
                f"record {i + 1} has an empty prompt and the tokenizer adds no BOS token",
                "give every record a prompt",
            )
    stop = eos_ids(model, tokenizer)
    preds = [""] * len(encs)
    for batch in _longest_first([len(e) for e in encs], batch_size, advance):
        gen = greedy_generate(
            model, tokenizer, [encs[i] for i in batch], max_new_tokens=max_new_tokens, stop_ids=stop
        )
        for j, i in enumerate(batch):
            preds[i] = prediction_text(tokenizer, gen[j])
    correct = [p == r["answer"].strip() for p, r in zip(preds, records, strict=True)]
    n = len(records)
    acc = sum(correct) / n
    out: dict[str, Any] = {"n": n, "metrics": {"accuracy": acc, "accuracy_stderr": _stderr(acc, n)}}
    if log_samples:
        out["samples"] = [
            {"prompt": r["prompt"], "answer": r["answer"], "prediction": p, "correct": c}
            for r, p, c in zip(records, preds, correct, strict=True)
        ]
    return out


# ---------------------------------------------------------------------------------------------
# multiple choice


def _choice_request(tokenizer: Any, prompt: str, choice: str) -> tuple[list[int], int]:
    """(tokens of prompt+choice, number of prompt tokens) with lm-eval's whitespace rule."""
    n_spaces = len(prompt) - len(prompt.rstrip())
    context, continuation = prompt, choice
    if n_spaces > 0 and len(prompt) > n_spaces:
        continuation = prompt[-n_spaces:] + choice
        context = prompt[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    n_ctx = len(encode(tokenizer, context))
    return whole, n_ctx


@torch.no_grad()
def choice_loglikelihoods(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    advance: Advance = _noop,
) -> list[list[float]]:
    """Summed log-probability of every choice of every record (float64 accumulation)."""
    device = input_device(model)
    pad = pad_id(tokenizer)
    requests: list[tuple[int, int, list[int], int]] = []  # (record, choice, tokens, first scored position)
    for r_i, rec in enumerate(records):
        for c_i, choice in enumerate(rec["choices"]):
            whole, n_ctx = _choice_request(tokenizer, rec["prompt"], choice)
            start = max(n_ctx, 1)  # the first token is never predicted
            if len(whole) > max_length + 1:  # keep the end (the choice), as lm-eval does
                cut = len(whole) - (max_length + 1)
                whole, start = whole[cut:], max(start - cut, 1)
            requests.append((r_i, c_i, whole, start))
    scores = [[0.0] * len(rec["choices"]) for rec in records]
    for batch in _longest_first([len(req[2]) for req in requests], batch_size, advance):
        rows = [requests[k][2][:-1] for k in batch]
        if max(len(r) for r in rows) > 0:
            _, logits = _padded_logits(model, [r if r else [pad] for r in rows], pad, device)
            for j, k in enumerate(batch):
                r_i, c_i, whole, start = requests[k]
                if start >= len(whole):
                    continue
                targets = torch.tensor(whole[start:], dtype=torch.long, device=logits.device)
                logp = torch.log_softmax(logits[j, start - 1 : len(whole) - 1].float(), dim=-1)
                scores[r_i][c_i] = float(logp.gather(-1, targets[:, None]).double().sum())
            del logits  # free it before the next batch's forward pass
    return scores


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def run_multiple_choice(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    advance: Advance = _noop,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Multiple-choice accuracy (``acc``) and length-normalised accuracy (``acc_norm``)."""
    scores = choice_loglikelihoods(
        model, tokenizer, records, batch_size=batch_size, max_length=max_length, advance=advance
    )
    n = len(records)
    picks, picks_norm = [], []
    for rec, ll in zip(records, scores, strict=True):
        picks.append(_argmax(ll))
        picks_norm.append(_argmax([s / len(c) for s, c in zip(ll, rec["choices"], strict=True)]))
    acc = sum(p == r["label"] for p, r in zip(picks, records, strict=True)) / n
    acc_norm = sum(p == r["label"] for p, r in zip(picks_norm, records, strict=True)) / n
    out: dict[str, Any] = {
        "n": n,
        "metrics": {
            "acc": acc,
            "acc_stderr": _stderr(acc, n),
            "acc_norm": acc_norm,
            "acc_norm_stderr": _stderr(acc_norm, n),
        },
    }
    if log_samples:
        out["samples"] = [
            {"loglikelihoods": ll, "pick": p, "pick_norm": q, "label": r["label"]}
            for ll, p, q, r in zip(scores, picks, picks_norm, records, strict=True)
        ]
    return out


# ---------------------------------------------------------------------------------------------
# the Python API


def _units(task: Task) -> int:
    if task.kind == MULTIPLE_CHOICE:
        return sum(len(r["choices"]) for r in task.records)
    return len(task.records)


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Iterable[Task | str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    max_length: int = 1024,
    progress: bool = True,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate an already-loaded causal LM on tasks (:class:`Task` objects or ``--task`` strings).

    Returns ``{"tasks": {name: {"kind", "source", "n", "metrics"[, "samples"]}}, "settings": {...}}``.
    The model is put in eval mode for the run and its previous mode restored afterwards.
    """
    check_run_options(
        limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length
    )
    task_list: list[Task] = []
    for t in tasks:
        task_list.extend([t] if isinstance(t, Task) else parse_task_spec(t))
    task_list = [t.limited(limit) for t in task_list]
    names = [t.name for t in task_list]
    if len(set(names)) != len(names):
        raise UserError("two tasks have the same name", "name them apart with --task NAME=PATH")

    results: dict[str, Any] = {}
    was_training = bool(getattr(model, "training", False))
    model.eval()
    bar = _progress(progress)
    try:
        with bar:
            for task in task_list:
                bar_id = bar.add_task(f"{task.name} ({task.kind})", total=_units(task))

                def advance(k: int, _bar_id: Any = bar_id) -> None:
                    bar.advance(_bar_id, k)

                common: dict[str, Any] = {
                    "batch_size": batch_size,
                    "advance": advance,
                    "log_samples": log_samples,
                }
                if task.kind == PERPLEXITY:
                    res = run_perplexity(model, tokenizer, task.records, max_length=max_length, **common)
                elif task.kind == EXACT_MATCH:
                    res = run_exact_match(
                        model, tokenizer, task.records, max_new_tokens=max_new_tokens, **common
                    )
                else:
                    res = run_multiple_choice(model, tokenizer, task.records, max_length=max_length, **common)
                results[task.name] = {"kind": task.kind, "source": task.source, **res}
    except UserError as exc:
        raise UserError(f"task '{task.name}': {exc.problem}", exc.fix) from None
    finally:
        if was_training:
            model.train()
    return {
        "tasks": results,
        "settings": {
            "limit": limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "max_length": max_length,
        },
    }


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )
