"""`moeprune generate MODEL --library LIB --prompt ...` and `moeprune chat MODEL --library LIB`:
generation with only the experts of the task each conversation is routed to."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from ..cli import app
from ..errors import UserError
from .options import device_option, dtype_option


def _load(model: str, library: Path, dtype: str, device: str, task: str | None) -> Any:
    from ..adaptive import AdaptiveMoE
    from ..device import resolve_device
    from ..library import Library

    lib = Library.load(library)
    if task is not None:
        lib.task(task)  # unknown task: clear error before loading
    am = AdaptiveMoE.from_library(model, lib, dtype=dtype, device=resolve_device(device))
    if am.tokenizer is None:
        raise UserError(f"model '{model}' has no tokenizer", "save a tokenizer in the model directory")
    return am


def _switch_line(sw: Any) -> str:
    if sw is None:
        return "(pattern already loaded)"
    return (
        f"loaded {sw.read_experts} experts ({sw.bytes_read / 2**20:.1f} MiB read), "
        f"reused {sw.reused_experts}, {sw.seconds * 1000:.0f} ms"
    )


@app.command("generate")
def generate(
    model: str = typer.Argument(..., help="The original model (directory or cached hub id)."),
    library: Path = typer.Option(..., "--library", "-l", help="Pattern library (`moeprune library build`)."),
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="A prompt (repeatable)."),
    file: Path | None = typer.Option(
        None, "--file", "-f", help="Prompts: .jsonl (prompt/text) or .txt lines."
    ),
    task: str | None = typer.Option(None, "--task", help="Use this task's pattern instead of routing."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Generation limit per prompt."),
    stop: list[str] | None = typer.Option(
        None,
        "--stop",
        help="End an answer at this text (repeatable; default: the end of the line, as `moeprune eval` "
        "does; --stop '' for the model's end-of-sequence token only).",
    ),
    output: Path | None = typer.Option(
        None, "--output", "--out", "-o", help="Write prompts, tasks and outputs as JSON."
    ),
    dtype: str = dtype_option(),
    device: str = device_option(),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output that moeprune wrote."),
) -> None:
    """Route each prompt to the nearest task, load only its experts, and generate greedily."""
    from ..adaptive import query_ids
    from ..commands.library import read_queries

    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}", "pass a number >= 1")
    prompts = list(prompt or [])
    if file is not None:
        prompts += [text for text, _ in read_queries(file)]
    if not prompts:
        raise UserError("no prompt given", "pass --prompt TEXT or --file F")
    for p in prompts:
        if not p.strip():
            raise UserError("a prompt is empty", "pass some text")
    target = None
    if output is not None:  # checked before loading anything (docs/outputs.md)
        from ..api import _is_routes_json, check_file_out, json_output, model_input

        check_file_out(output, "--output", "generations.json")
        reads = [("library", library), model_input(model), ("prompt file", file)]
        target = json_output(output, inputs=reads, force=force, owned=_is_routes_json)
    am = _load(model, library, dtype, device, task)
    for p in prompts:  # every prompt must tokenise before any generation
        query_ids(am.tokenizer, p)
    print(
        f"model: non-expert weights {am.load_stats.non_expert_bytes / 2**20:.1f} MiB read once; "
        f"{am.library.keep}/{am.library.num_experts} experts per layer from library {library}"
        + (f"; {am.quantization}" if am.quantization else ""),
        file=sys.stderr,
    )
    stops = ["\n"] if stop is None else [s for s in stop if s]
    results = []
    for n, p in enumerate(prompts):
        if task is not None:
            sw = am.activate(task) if am.current != task else None
            chosen, distances, far = task, None, None
        else:
            match, sw = am.prepare(p)
            chosen, distances, far = match.task, match.distances, match.far_warning()
        done = am.complete(query_ids(am.tokenizer, p), max_new_tokens=max_new_tokens, stop=stops)
        print(f"[{chosen}] {_switch_line(sw)}", file=sys.stderr)
        if far is not None:
            print(far, file=sys.stderr)
        print(show_answer(p, done.text) + ("\n" if n < len(prompts) - 1 else ""), flush=True)
        results.append(
            {
                "prompt": p,
                "task": chosen,
                "distances": distances,
                "far": far is not None,
                "output": done.text,
                "ended_by": done.reason,
                "switch": None if sw is None else {**sw.__dict__},
            }
        )
    if target is not None:
        text = json.dumps({"library": str(library), "results": results}, indent=2) + "\n"
        with target as tmp:
            tmp.write_text(text, encoding="utf-8")


def show_answer(prompt: str, answer: str) -> str:
    """A prompt ("> " before each of its lines) and its answer below it."""
    quoted = "\n".join("> " + line for line in prompt.rstrip().splitlines())
    return f"{quoted}\n{answer.rstrip()}"


CHAT_HELP = (
    "/new starts a new conversation (routed again), /task NAME starts a new conversation with that "
    "task's experts, /tasks lists them, /quit ends."
)


@app.command("chat")
def chat(
    model: str = typer.Argument(..., help="The original model (directory or cached hub id)."),
    library: Path = typer.Option(..., "--library", "-l", help="Pattern library (`moeprune library build`)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Generation limit per reply."),
    dtype: str = dtype_option(),
    device: str = device_option(),
) -> None:
    """Interactive chat: each conversation is routed by its first message and runs with only that
    task's experts."""
    if max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens must be positive, got {max_new_tokens}", "pass a number >= 1")
    am = _load(model, library, dtype, device, None)
    print(f"moeprune chat: tasks {', '.join(am.library.names)}. {CHAT_HELP}", file=sys.stderr)
    history: list[dict[str, str]] = []
    forced: str | None = None
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/new":
            history, forced = [], None
            print("(new conversation)", file=sys.stderr)
            continue
        if text == "/tasks":
            print(", ".join(am.library.names))
            continue
        if text.startswith("/task"):
            name = text[len("/task") :].strip()
            if name not in am.library.tasks:
                print(f"unknown task '{name}'; tasks: {', '.join(am.library.names)}", file=sys.stderr)
                continue
            history, forced = [], name  # another task's experts: its earlier replies do not carry over
            sw = am.activate(name) if am.current != name else None
            print(f"[{name}] {_switch_line(sw)} (new conversation)", file=sys.stderr)
            continue
        if not history and forced is None:
            try:
                match, sw = am.prepare(text)
            except UserError as exc:  # e.g. a message that tokenises to nothing: say so, keep going
                print(exc.line(), file=sys.stderr)
                continue
            print(f"[{match.task}] {_switch_line(sw)}", file=sys.stderr)
            if match.far:
                print(match.far_warning(), file=sys.stderr)
        history.append({"role": "user", "content": text})
        ids = conversation_ids(am.tokenizer, history)
        reply = am.continue_ids(ids, max_new_tokens=max_new_tokens).strip()
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


def conversation_ids(tokenizer: Any, history: list[dict[str, str]]) -> list[int]:
    """The token ids of a conversation so far, ready for the next reply: the chat template when the
    tokenizer has one, else the turns one after another, each reply ending a line."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    from ..adaptive import query_ids

    parts = []
    for turn in history:
        parts.append(turn["content"] if turn["role"] == "user" else " " + turn["content"] + "\n")
    return query_ids(tokenizer, "".join(parts).rstrip(" ") + (" " if history[-1]["role"] == "user" else ""))
