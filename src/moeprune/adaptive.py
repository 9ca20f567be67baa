"""A model that loads only the experts a query needs (PreMoe task-adaptive expert retrieval).

:class:`AdaptiveMoE` holds a causal LM shaped like a checkpoint pruned to K experts per MoE layer
(the library's K), whose expert slots are filled from the *original* safetensors files:

1. at start, every non-expert tensor is read once (attention, norms, embeddings, dense and shared
   MLPs) and the routers' full [E, ...] tensors are kept aside (small: E x hidden per layer);
   no routed-expert byte is read;
2. a query is routed by a forward that stops at the first MoE router (so no expert is needed):
   the router's input is scored by the full first router, the PreMoe statistic of the query's
   tokens is compared with the library keys, and the nearest task wins;
3. activating a task fills each MoE layer's K slots with that task's kept experts in ascending
   id order (the order a pruned checkpoint has, so the logits are the pruned checkpoint's):
   experts already in memory (shared with the previous task) are moved, only the others are read
   from the checkpoint -- per-expert keys whole, fused [E, ...] tensors as slices of their expert
   axis -- and converted to the model's layout by transformers' own loader, one layer at a time.
   Router rows are sliced from the kept-aside full routers; the rest of the model is never reread.

Quantized checkpoints (fp8 block-wise, mxfp4) are read as published and every weight is
dequantized to the model's dtype when it is read (``AdaptiveMoE.quantization`` says so): the model
holds only K experts per layer, so their float copies are what a pruned checkpoint would hold.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .library import Library, Match

__all__ = ["AdaptiveMoE", "Completion", "Switch", "query_ids"]


def _check_complete(lm: nn.Module, blocks: Sequence[Any], targets: set[str], path: Any) -> None:
    """Every tensor of ``lm`` but the experts and routers (``targets``: loaded per task) came from
    the checkpoint: a missing one is refused, as by moeprune.load, instead of running random."""
    from .load import refuse_inexact

    later = {id(p) for b in blocks for m in (b.experts(lm), b.router(lm)) for p in m.parameters()}
    missing = [n for n, p in lm.named_parameters() if p.is_meta and id(p) not in later and n not in targets]
    refuse_inexact(path, {"missing_keys": missing})


class _StopForward(Exception):
    pass


@dataclass
class Switch:
    """What one activation did."""

    task: str
    previous: str | None
    read_experts: int  # (layer, expert) pairs read from disk
    reused_experts: int  # (layer, expert) pairs kept in memory
    bytes_read: int  # expert bytes read from the checkpoint
    seconds: float


@dataclass
class Completion:
    """One generated continuation and why it ended: "eos" (an end-of-sequence token), "stop" (a
    stop text, cut off) or "length" (max_new_tokens reached)."""

    text: str
    reason: str
    tokens: int


@dataclass
class LoadStats:
    """What loading the adaptive model read and holds."""

    non_expert_bytes: int = 0  # read once at start (router tensors included)
    seconds: float = 0.0


def query_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of a query: the prompt as generation sees it (BOS added as the tokenizer does)."""
    from .data import Record, encode_prompt

    if not isinstance(text, str) or not text.strip():
        raise UserError("the query is empty", "pass some text")
    ids = encode_prompt(tokenizer, Record(where="query", prompt=text))
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    if not [i for i in ids if i not in specials]:
        raise UserError(f"the query {text[:40]!r} tokenises to nothing", "pass some text the tokenizer knows")
    return ids


class AdaptiveMoE:
    """A causal LM with K experts per MoE layer, filled from a pattern library on demand."""

    def __init__(self) -> None:  # use from_library
        raise TypeError("use AdaptiveMoE.from_library(model, library)")

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def from_library(
        cls,
        model: str | Path,
        library: str | Path | Library,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        task: str | None = None,
    ) -> AdaptiveMoE:
        """Load the non-expert weights of ``model`` once; experts are read when a task is activated
        (``task`` now, else on the first :meth:`generate` / :meth:`activate`)."""
        self = cls.__new__(cls)
        self._build(str(model), library, dtype, torch.device(device))
        if task is not None:
            self.activate(task)
        return self

    def _build(self, model: str, library: str | Path | Library, dtype: Any, device: torch.device) -> None:
        from .arch import find_moe_blocks
        from .arch.keys import map_expert_keys
        from .arch.pruned import PrunedLayout, apply_layout
        from .arch.variants import whole_layers
        from .checkpoint import Checkpoint
        from .load import disable_aux_loss
        from .modelio import build_on_meta, load_config, load_tokenizer, parse_dtype, resolve_model_dir
        from .offload import ShardReader, _materialize_buffers, loader_config
        from .quant import quant_format
        from .surgery import pruned_config

        t0 = time.perf_counter()
        self.library = library if isinstance(library, Library) else Library.load(library)
        lib = self.library
        path = resolve_model_dir(model)
        config = load_config(str(path))
        # fp8 / mxfp4 checkpoints: every weight is dequantized when it is read (experts included:
        # the adaptive model holds only K experts per layer); other methods are refused here
        self.quant = quant_format(config)
        self.quantization = None if self.quant is None else f"{self.quant.label}: dequantized when read"
        if isinstance(dtype, torch.dtype):
            torch_dtype = dtype
        else:  # auto: as every command (moeprune.device.resolve_dtype)
            from .device import resolve_dtype

            torch_dtype = parse_dtype(resolve_dtype(str(dtype), str(device), config))
        config.dtype = torch_dtype

        # the original layout (E experts, on meta): what the checkpoint holds
        full = build_on_meta(config).eval()
        full_blocks = find_moe_blocks(full)
        lib.check_model(config, model, full_blocks)
        self.checkpoint = Checkpoint.open(path)
        self.keymap = map_expert_keys(full, full_blocks, self.checkpoint.shapes())
        if lib.router_sha256:  # the library was built on this very checkpoint (router weights)
            from .identity import keymap_router_digest

            lib.check_model(config, model, full_blocks, keymap_router_digest(self.checkpoint, self.keymap))
        self.reader = ShardReader(path, backend="pread")

        # the adaptive model: shaped like a checkpoint pruned to K experts per MoE layer
        num_experts = full_blocks[0].num_experts
        raw = config.to_dict()
        raw.pop("quantization_config", None)  # the model in memory holds dequantized weights
        whole = whole_layers(full)  # hash-routed layers (DeepSeek-V4) keep all their experts
        layout = None
        if whole:
            per_layer = {**{b.layer: lib.keep for b in full_blocks}, **whole}
            layout = PrunedLayout(mode="remove", experts_per_layer=per_layer, original_experts=num_experts)
        pruned = pruned_config(raw, config, num_experts, num_experts if whole else lib.keep, None, layout)
        kconfig = type(config).from_dict(pruned)
        kconfig.dtype = torch_dtype
        lm = build_on_meta(kconfig).eval()
        if layout is not None:
            apply_layout(lm, layout)
        blocks = find_moe_blocks(lm)
        if [b.layer for b in blocks] != [b.layer for b in full_blocks]:
            raise RuntimeError("the pruned model has other MoE layers than the original")

        self._lc_full = loader_config(full, path, device, torch_dtype)
        lc_model = loader_config(lm, path, device, torch_dtype)
        expert_keys = [k for k, ek in self.keymap.keys.items() if ek.kind != "router"]
        router_keys = [k for k, ek in self.keymap.keys.items() if ek.kind == "router"]
        skip = set(expert_keys) | set(router_keys)
        rest = [k for k in self.checkpoint.tensors if k not in skip]

        stats = LoadStats()
        # 1. every non-expert tensor, once
        self._load(lm, rest, lc_model)
        stats.non_expert_bytes += sum(self.checkpoint.info(k).nbytes for k in rest)
        lm.tie_weights()  # a tied LM head is not in the checkpoint (a no-op for untied models)
        _check_complete(lm, blocks, {ek.target for ek in self.keymap.keys.values() if ek.target}, path)
        _materialize_buffers(lm, lm, "", device)
        # 2. the full routers, kept aside (loaded into the E-sized skeleton, then taken out)
        self._load(full, router_keys, self._lc_full)
        stats.non_expert_bytes += sum(self.checkpoint.info(k).nbytes for k in router_keys)
        # decoder layer -> {model tensor path: (its full [E, ...] tensor, expert axis)}
        self._router_full: dict[int, dict[str, tuple[torch.Tensor, int]]] = {b.layer: {} for b in blocks}
        for ek in self.keymap.keys.values():
            if ek.kind == "router" and ek.target is not None:
                full_tensor = full.get_parameter_or_buffer(ek.target).detach()
                self._router_full[ek.layer][ek.target] = (full_tensor, ek.model_axis)
        # the first MoE layer's full router module stays loaded: it scores queries
        self._probe = full_blocks[0].router(full)
        _complete_from(self._probe, blocks[0].router(lm))

        self.model = disable_aux_loss(lm)  # inference only: no router auxiliary loss
        self.config = kconfig
        self.blocks = blocks
        self._full = full
        self._full_blocks = full_blocks
        self.device = device
        self.dtype = torch_dtype
        self.path = path
        try:
            self.tokenizer = load_tokenizer(path)
        except (OSError, ValueError):
            self.tokenizer = None
        _load_generation_config(lm, path)
        self.current: str | None = None
        self._slots: dict[int, list[int]] = {}  # layer -> expert id in each slot
        self.switches: list[Switch] = []
        stats.seconds = time.perf_counter() - t0
        self.load_stats = stats

    def _load(self, model: nn.Module, keys: Sequence[str], load_config: Any) -> None:
        from .offload import _load_tensors

        if keys:
            _load_tensors(model, self.reader, list(keys), load_config, self.quant)

    # --- routing --------------------------------------------------------------------------------

    @torch.no_grad()
    def first_router_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Router logits [T, E] of the first MoE layer over all E experts, from a forward that stops
        at that layer's router (no expert of any MoE layer is used)."""
        captured: dict[str, torch.Tensor] = {}
        router = self.blocks[0].router(self.model)

        def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        handle = router.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError("the forward did not reach the first MoE router")
        # the router's other inputs (e.g. AfMoE's expert bias, passed by the block) are the K-sized
        # tensors of the adaptive model: the probe gets their full versions
        full = {
            id(self.model.get_parameter_or_buffer(target)): tensor
            for target, (tensor, _axis) in self._router_full[self.blocks[0].layer].items()
        }
        args = tuple(full.get(id(a), a) for a in captured["args"])
        kwargs = {k: full.get(id(v), v) for k, v in captured["kwargs"].items()}
        out = self._probe(*args, **kwargs)
        logits = self._full_blocks[0].router_logits(self._probe, args[0], out)  # all router columns
        return logits.reshape(-1, logits.shape[-1])

    def query_statistics(self, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query's PreMoe key at the first MoE layer [E], its tokens' selected experts
        there [T, k] and their gate weights [T, k] (full routing over all E experts)."""
        from .arch.routing import route
        from .library import query_keys
        from .score import premoe_token_entries

        if self.tokenizer is None:
            raise UserError(
                f"model '{self.path}' has no tokenizer", "save a tokenizer in the model directory"
            )
        # the library's keys and patterns live on the CPU: compare there whatever the model's device
        logits = self.first_router_logits(query_ids(self.tokenizer, text)).float().cpu()
        first = self._full_blocks[0]
        q, f, idx = premoe_token_entries(logits[:, : first.num_experts], self.library.ka)
        key = query_keys((q[None], f[None], idx[None]), self.library.num_experts)["first"]
        bias_path = first.selection_bias_path
        bias = None if bias_path is None else self._router_full[first.layer][bias_path][0].cpu()
        scale_path = first.weight_scale_path  # Gemma-4 per-expert / Inkling global weight scale
        scale = None
        if scale_path is not None:
            held = self._router_full[first.layer].get(scale_path)
            scale = held[0].cpu() if held is not None else self.model.get_parameter(scale_path).detach().cpu()
        r = route(first.spec, logits, bias, weight_scale=scale)
        return key, r.top_k_index, r.top_k_weights

    def route(self, text: str) -> Match:
        """The library task nearest to ``text`` by its first-MoE-layer statistic (the library's
        per-record keys when it has them, else PreMoe's per-task key)."""
        key, _, _ = self.query_statistics(text)
        return self.library.match(key)

    # --- switching ------------------------------------------------------------------------------

    @torch.no_grad()
    def activate(self, task: str) -> Switch:
        """Fill every MoE layer with ``task``'s kept experts (only the missing ones are read)."""
        from .offload import _check_loaded, _trim_heap

        pattern = self.library.task(task)
        t0 = time.perf_counter()
        read = reused = nbytes = 0
        for b, fb in zip(self.blocks, self._full_blocks, strict=True):
            kept = sorted(pattern.kept(b.layer))
            old = self._slots.get(b.layer, [])
            where = {e: s for s, e in enumerate(old)}
            new_ids = [e for e in kept if e not in where]
            fresh, read_bytes = self._read_experts(fb, new_ids) if new_ids else ({}, 0)
            nbytes += read_bytes
            self._fill_experts(b, kept, where, new_ids, fresh)
            self._fill_router(b, kept)
            self._slots[b.layer] = kept
            read += len(new_ids)
            reused += len(kept) - len(new_ids)
            if new_ids:
                fb.experts(self._full).to_empty(device="meta")
                del fresh
                _trim_heap()  # the layer's transient buffers go back to the OS (glibc keeps them otherwise)
        if self.current is None:
            _check_loaded(self.model, "", "the adaptive model")
        sw = Switch(task, self.current, read, reused, nbytes, time.perf_counter() - t0)
        self.current = task
        self.switches.append(sw)
        return sw

    def _read_experts(self, fb: Any, new_ids: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        """The ``new_ids`` experts of one block, converted to the model's layout ({param: [n, ...]}),
        and the checkpoint bytes read."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        from .arch.pruned import expert_tensor, resize_experts
        from .checkpoint import contiguous_runs
        from .offload import _quiet_sync_loading

        ex = fb.experts(self._full)
        n = len(new_ids)
        resize_experts(ex, fb.layout, n)
        pos = {e: i for i, e in enumerate(new_ids)}
        wanted = [ek for ek in self.keymap.of_block(fb.index) if ek.kind != "router"]
        per_expert = [ek for ek in wanted if ek.kind == "per_expert" and ek.expert in pos]
        fused = [ek for ek in wanted if ek.kind == "fused"]
        state: dict[str, Any] = {}
        nbytes = 0
        with self.reader.open([ek.key for ek in per_expert + fused]) as slices:
            for ek in per_expert:  # lazy: read by the loader when it stacks them
                state[ek.renumbered(pos[ek.expert])] = slices[ek.key]
                nbytes += self.checkpoint.info(ek.key).nbytes
            for ek in fused:
                info = self.checkpoint.info(ek.key)
                axis, rows = ek.axis or 0, ek.rows  # DBRX: `rows` rows per expert
                lead: list[Any] = [slice(None)] * axis
                runs = contiguous_runs(new_ids)
                parts = [slices[ek.key][(*lead, slice(a * rows, (b + 1) * rows))] for a, b in runs]
                state[ek.key] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)
                nbytes += info.entry_bytes(axis) * n * rows
            if self.quant is not None:  # fp8 weights with their scales -> floats, as unquantized keys
                from .quant import dequantize_tensors

                state = dequantize_tensors({k: v[:] for k, v in state.items()}, self.quant, self.dtype)
            with _quiet_sync_loading():
                info, _ = convert_and_load_state_dict_in_model(self._full, state, self._lc_full)
            del state
        if info.mismatched_keys or info.conversion_errors:
            raise UserError(
                f"cannot load the experts of MoE layer {fb.layer} from the checkpoint "
                f"({sorted(info.mismatched_keys, key=str)[:1] or list(info.conversion_errors)[:1]})",
                "the checkpoint does not match its config.json",
            )
        out: dict[str, torch.Tensor] = {}
        for name in fb.layout.tensors:
            t = expert_tensor(ex, fb.layout, name)
            if t.is_meta:
                raise UserError(
                    f"the checkpoint gave no '{fb.experts_path}.{name}' for experts {new_ids[:4]}",
                    "the checkpoint does not match its config.json",
                )
            out[name] = t.detach()
        return out, nbytes

    def _fill_experts(
        self, b: Any, kept: list[int], where: dict[int, int], new_ids: list[int], fresh: dict[str, Any]
    ) -> None:
        """Slot s of every expert tensor gets expert ``kept[s]``: moved from its old slot, or taken
        from ``fresh`` (the experts just read, in ``new_ids`` order)."""
        from .arch.pruned import expert_storage, expert_tensor

        ex = b.experts(self.model)
        pos_new = {e: i for i, e in enumerate(new_ids)}
        for name in b.layout.tensors:
            cur = expert_tensor(ex, b.layout, name)
            if new_ids == kept:  # nothing kept from before: the loaded tensor is already in order
                _set_tensor(*expert_storage(ex, b.layout, name, fresh[name].to(self.device)))
                continue
            shape = list(cur.shape)
            shape[0] = len(kept)
            dtype = fresh[name].dtype if name in fresh else cur.dtype
            target = torch.empty(shape, dtype=dtype, device=self.device)
            # one copy per slot: a plain memcpy, 2-3x faster on CPU than index_select + index_copy_
            for slot, e in enumerate(kept):
                target[slot].copy_(cur[where[e]] if e in where else fresh[name][pos_new[e]])
            _set_tensor(*expert_storage(ex, b.layout, name, target))

    def _fill_router(self, b: Any, kept: list[int]) -> None:
        for target, (full, axis) in self._router_full[b.layer].items():
            owner_path, _, name = target.rpartition(".")
            owner = self.model.get_submodule(owner_path)
            # non-prunable router rows (Longcat zero / Inkling shared experts) stay, last
            extra = list(range(self._full_blocks[0].num_experts, full.shape[axis]))
            ids = torch.tensor(list(kept) + extra, dtype=torch.long)
            value = full.index_select(axis, ids.to(full.device)).to(self.device).contiguous()
            _set_tensor(owner, name, value)

    # --- generation -----------------------------------------------------------------------------

    def prepare(self, text: str) -> tuple[Match, Switch | None]:
        """Route ``text`` (a conversation's first message) and activate its task if needed."""
        match = self.route(text)
        switch = None if match.task == self.current else self.activate(match.task)
        return match, switch

    @torch.no_grad()
    def generate(self, prompt: str, *, max_new_tokens: int = 64, route: bool = True, **kwargs: Any) -> str:
        """Greedy continuation of ``prompt`` (routed first unless ``route`` is False)."""
        if route or self.current is None:
            self.prepare(prompt)
        ids = query_ids(self.tokenizer, prompt)
        return self.continue_ids(ids, max_new_tokens=max_new_tokens, **kwargs)

    @torch.no_grad()
    def continue_ids(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int = 64,
        stop: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Greedy continuation of token ids with the active pattern (text after the prompt, up to
        the model's EOS or the first ``stop`` text, which is not included)."""
        return self.complete(ids, max_new_tokens=max_new_tokens, stop=stop, **kwargs).text

    @torch.no_grad()
    def complete(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int = 64,
        stop: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> Completion:
        """:meth:`continue_ids` with why it ended. It ends at any EOS id of the tokenizer and of
        the checkpoint's generation_config.json (e.g. a chat model's end-of-turn token), as
        `moeprune eval` does, or at the first of the ``stop`` texts."""
        from .evaluate.runners import eos_ids

        if self.current is None:
            raise UserError("no task is active", "route a query first or pass a task")
        tok = self.tokenizer
        stops = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
        eos = sorted(eos_ids(self.model, tok))
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else None)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": pad,
            "attention_mask": torch.ones_like(input_ids),
        }
        if eos:
            gen_kwargs["eos_token_id"] = eos
        if stops:
            gen_kwargs["stop_strings"] = stops
            gen_kwargs["tokenizer"] = tok
        gen_kwargs.update(kwargs)
        out = self.model.generate(input_ids, **gen_kwargs)
        new = out[0, input_ids.shape[1] :].tolist()
        ended = bool(new) and new[-1] in eos
        # the EOS token is not part of the answer (an EOS id need not be a special token)
        text = tok.decode(new[:-1] if ended else new, skip_special_tokens=True)
        cut = [text.index(s) for s in stops if s in text]
        if cut:
            return Completion(text[: min(cut)], "stop", len(new))
        return Completion(text, "eos" if ended else "length", len(new))

    # --- sizes ----------------------------------------------------------------------------------

    def expert_bytes(self, per_layer: int | None = None) -> int:
        """Bytes of ``per_layer`` (default K) experts in every MoE layer, in the loaded dtype."""
        from .arch.pruned import expert_tensor

        k = self.library.keep if per_layer is None else per_layer
        total = 0
        for b in self.blocks:
            ex = b.experts(self.model)
            for name in b.layout.tensors:
                t = expert_tensor(ex, b.layout, name)
                total += t[0].numel() * self.dtype.itemsize * k if t.dim() else 0
        return total

    def non_expert_bytes(self) -> int:
        """Bytes of every tensor of the model that is not a routed expert (loaded dtype)."""
        experts = {id(b.experts(self.model).get_parameter(n)) for b in self.blocks for n in b.layout.tensors}
        seen: set[int] = set()
        total = 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if id(t) in experts or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return total


def _load_generation_config(model: nn.Module, path: Path) -> None:
    """The checkpoint's generation_config.json, as from_pretrained would load it (its EOS list
    ends a reply); the model built from config.json alone knows only config.json's EOS."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return
    with contextlib.suppress(OSError, ValueError):  # unreadable: keep the one from config.json
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)


def _set_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


def _complete_from(probe: nn.Module, loaded: nn.Module) -> None:
    """Give the full-size probe router the tensors without an expert axis (scales, norms,
    non-persistent buffers) that were loaded into the adaptive model's router."""
    for name, t in list(probe.named_parameters()) + list(probe.named_buffers()):
        if not t.is_meta:
            continue
        owner_path, _, attr = name.rpartition(".")
        src = loaded.get_submodule(owner_path) if owner_path else loaded
        value = getattr(src, attr, None)
        if not isinstance(value, torch.Tensor) or value.is_meta or value.shape != t.shape:
            raise UserError(
                f"cannot build the full first router: '{name}' {list(t.shape)} is not in the checkpoint",
                "the checkpoint does not match its config.json",
            )
        _set_tensor(probe.get_submodule(owner_path) if owner_path else probe, attr, value)
