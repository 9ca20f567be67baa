"""The expert profile (``*.profile.safetensors``): what one calibration pass measured.

The format is specified in ``docs/profile-format.md``. :class:`Profile` holds the tensors and the
metadata, writes them atomically, reads and validates them (a corrupted or foreign file is a
clear :class:`~moeprune.errors.UserError`), refuses to be used with a different model
(:meth:`Profile.check_model`), and merges profiles of the same model exactly
(:meth:`Profile.merge`: sums and PreMoe's histograms add, MoNE mean/M2 combine with Chan's
update, per-sample rows and PreMoe's optional per-token entries concatenate in order).

Integrity: a profile stores the sha256 of every tensor (and of its metadata) in its header and
:meth:`Profile.load` verifies them; every tensor is checked for NaN/Inf and for values no
calibration can produce (negative or fractional counts, negative sums of non-negative terms), and
the error names the tensor, the MoE layer and the expert.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

# the config fingerprint lives in the torch-free identity module (the rewrite checks it); named
# here too for the callers that import it from the profile module
from .identity import fingerprint_fields, model_fingerprint  # noqa: F401
from .profile_file import CHECKSUM_KEY, FORMAT, NOVICE_TENSORS, OLD_FORMATS, tensor_digest

__all__ = [
    "FORMAT",
    "NOVICE_FITS",
    "SUM_TENSORS",
    "Profile",
    "atomic_write",
    "fingerprint_fields",
    "model_fingerprint",
]

SUM_TENSORS = ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1")  # [L, E] float64
NOVICE_FITS = tuple(NOVICE_TENSORS)  # what a novice is fitted to (Profile.novices)
# the least-squares novices (docs/methods.md): optional, absent in profiles written before them
LSQ_TENSORS = ("gate_sq", "novice_lsq")  # [L, E] float64 Σ g², [L, E, H] float32 Σ g² e / Σ g²
PREMOE_TENSORS = {"premoe_q": torch.float32, "premoe_f": torch.float32, "premoe_idx": torch.int32}
PREMOE_HIST_TENSORS = ("premoe_hist_f", "premoe_hist_qf", "premoe_hist_n")  # [L, E, B] float64
PREMOE_BOUNDED = (*PREMOE_HIST_TENSORS, "premoe_edges", "premoe_qmax", "premoe_ka")
# tensors whose every value is >= 0 (sums of non-negative terms, counts)
NON_NEGATIVE = (
    "tokens", "count", "prob", "reap_sum", "easyep", "mone_m2", "gate_sq", "premoe_hist_f", "premoe_hist_qf",
    "premoe_hist_n", "premoe_qmax", "sample_premoe", "premoe_edges",
)  # fmt: skip
INTEGRAL = ("tokens", "count", "premoe_hist_n")  # counts stored as float64
META_KEYS = (
    "format",
    "tool_version",
    "model",
    "model_fingerprint",
    "model_type",
    "architecture",
    "layers",
    "num_experts",
    "top_k",
    "hidden_size",
    "tokens",
    "samples",
    "data",
    "settings",
)


# --- model identity ---------------------------------------------------------------------------


def _describe(fields: dict[str, Any]) -> str:
    return (
        f"{fields['model_type']}, hidden {fields['hidden_size']}, {len(fields['moe_layers'])} MoE layers of "
        f"{fields['num_hidden_layers']}, {fields['num_experts']} experts, top-{fields['top_k']}"
    )


# --- atomic writing ---------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file beside it, then rename: a reader (or an interrupt)
    never sees a partial file; see :func:`moeprune.outputs.atomic_write`."""
    from .outputs import atomic_write as write_file

    write_file(path, write)


# --- checksums --------------------------------------------------------------------------------


def tensor_sha256(x: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (C order): :func:`moeprune.profile_file.tensor_digest`."""
    data = x.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().data  # (no copy)
    return tensor_digest(str(x.dtype), list(x.shape), data)


def checksums(tensors: dict[str, torch.Tensor], meta_text: str) -> dict[str, str]:
    """The checksums a profile's header stores: one per tensor, and ``__meta__`` for the metadata."""
    out = {name: tensor_sha256(x) for name, x in tensors.items()}
    out["__meta__"] = hashlib.sha256(meta_text.encode()).hexdigest()
    return out


def _verify_checksums(path: str, header: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    def corrupt(problem: str) -> UserError:
        return UserError(
            f"profile '{path}' is corrupted: {problem}",
            "re-create it with `moeprune profile` (or restore it from a copy)",
        )

    try:
        stored = json.loads(header[CHECKSUM_KEY])
        if not isinstance(stored, dict):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        raise corrupt("its checksums are missing or unreadable") from None
    if set(stored) != {*tensors, "__meta__"}:
        extra = sorted(set(tensors) ^ (set(stored) - {"__meta__"}))
        raise corrupt(f"its tensors do not match its checksum list ({', '.join(extra) or '__meta__'})")
    if hashlib.sha256(header["meta"].encode()).hexdigest() != stored["__meta__"]:
        raise corrupt("its metadata does not match its checksum")
    for name, x in tensors.items():
        if tensor_sha256(x) != stored[name]:
            raise corrupt(f"tensor '{name}' does not match its checksum (the file changed after it was written)")


# --- the profile -----------------------------------------------------------------------------


class _Corrupt(Exception):
    pass


# far above any model (layers, hidden size), like plan.MAX_EXPERTS for experts
MAX_LAYERS = 1 << 14
MAX_HIDDEN = 1 << 20


def _check_meta_sizes(m: dict[str, Any], L: int, E: int, H: int, T: int, S: int) -> None:
    """The sizes the header states, bounded before anything is compared or sized by them: no more
    layers or experts than any model has (the tensors and the model are then checked against them),
    no negative count, no more samples than tokens (every sample has at least one)."""
    from .plan import MAX_EXPERTS

    layers = m["layers"]
    if not isinstance(layers, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
        raise _Corrupt("metadata 'layers' is not a list of layer indices")
    if not 1 <= L <= MAX_LAYERS or len(set(layers)) != L:
        raise _Corrupt(f"metadata lists {L} MoE layers (expected 1..{MAX_LAYERS} distinct indices)")
    if not 1 <= E <= MAX_EXPERTS:
        raise _Corrupt(f"metadata says {E} experts per layer (expected 1..{MAX_EXPERTS})")
    if not 1 <= H <= MAX_HIDDEN:
        raise _Corrupt(f"metadata says hidden size {H} (expected 1..{MAX_HIDDEN})")
    if T < 0 or S < 0 or S > T:
        raise _Corrupt(f"metadata says {T} tokens from {S} samples (expected 0 <= samples <= tokens)")
    top_k = m.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E):
        raise _Corrupt(f"metadata says top-k {top_k!r} (expected 1..{E})")


@dataclass
class Profile:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: str | None = field(default=None, compare=False)

    # --- shape facts -----------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.meta["layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def tokens(self) -> int:
        return int(self.meta["tokens"])

    @property
    def samples(self) -> int:
        return int(self.meta["samples"])

    @property
    def premoe_ka(self) -> int:
        from .score import stored_ka

        return stored_ka(self)

    @property
    def premoe_exact(self) -> bool:
        """Whether PreMoe's per-token entries are kept (``--premoe-exact``; size grows with tokens)."""
        return "premoe_q" in self.tensors

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.meta["layers"]]

    @property
    def name(self) -> str:
        return self.path or "<profile>"

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def novices(self, fit: str = "mean") -> torch.Tensor:
        """The novice vectors [L, E, H] (float32): ``mean`` MoNE's ē_i (`mone_mean`), ``lsq`` the
        gate-weighted least-squares fit Σ g² e / Σ g² (`novice_lsq`, docs/methods.md)."""
        if fit not in NOVICE_FITS:
            raise UserError(f"unknown novice fit '{fit}'", f"use {' or '.join(NOVICE_FITS)}")
        name = NOVICE_TENSORS[fit]
        if name not in self.tensors:
            raise UserError(
                f"profile '{self.name}' has no least-squares novices (written before they were added)",
                "re-create it with `moeprune profile`, or use --novice mean",
            )
        return self.tensors[name]

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        tensors: dict[str, torch.Tensor],
        *,
        model: str,
        config: Any,
        blocks: Sequence[Any],
        samples: int,
        data: list[dict[str, Any]],
        settings: dict[str, Any],
        router_sha256: str | None = None,
    ) -> Profile:
        """``router_sha256``: the model's router digest (:mod:`moeprune.identity`), if known."""
        from . import __version__
        from .identity import KEY

        fields = fingerprint_fields(config, blocks)
        archs = getattr(config, "architectures", None) or []
        meta = {
            "format": FORMAT,
            "tool_version": __version__,
            "model": model,
            "model_fingerprint": model_fingerprint(fields),
            "model_type": fields["model_type"],
            "architecture": archs[0] if archs else "",
            "layers": fields["moe_layers"],
            "num_experts": fields["num_experts"],
            "top_k": fields["top_k"],
            "hidden_size": fields["hidden_size"],
            "tokens": int(tensors["tokens"].item()),
            "samples": int(samples),
            "data": data,
            "settings": settings,
            "num_hidden_layers": fields["num_hidden_layers"],
            # routing semantics of the MoE layers (group-limited routing constrains plans)
            "routing": blocks[0].spec.describe() if blocks else {},
        }
        if router_sha256:
            meta[KEY] = router_sha256  # the weights, beyond the config's shape
        prof = cls(meta=meta, tensors=tensors)
        prof.validate()
        return prof

    # --- validation -------------------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        return {
            "model_type": self.meta["model_type"],
            "hidden_size": self.hidden_size,
            "num_hidden_layers": int(self.meta.get("num_hidden_layers", -1)),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": self.layers,
        }

    def validate(self) -> None:
        """Check the metadata and every tensor's shape and dtype; raises UserError naming the file."""
        try:
            self._check()
        except _Corrupt as exc:
            raise UserError(
                f"profile '{self.name}' is corrupted: {exc}",
                "re-create it with `moeprune profile`",
            ) from None

    def _check(self) -> None:
        m = self.meta
        missing = [k for k in META_KEYS if k not in m]
        if missing:
            raise _Corrupt(f"metadata lacks {', '.join(missing)}")
        try:
            L, E, H = len(m["layers"]), int(m["num_experts"]), int(m["hidden_size"])
            T, S = int(m["tokens"]), int(m["samples"])
        except (TypeError, ValueError) as exc:
            raise _Corrupt(f"bad metadata ({exc})") from None
        _check_meta_sizes(m, L, E, H, T, S)
        t = self.tensors

        def need(name: str, shape: tuple[int | None, ...], dtype: torch.dtype) -> torch.Tensor:
            if name not in t:
                raise _Corrupt(f"tensor '{name}' is missing")
            x = t[name]
            if x.dtype != dtype:
                raise _Corrupt(f"tensor '{name}' is {x.dtype}, expected {dtype}")
            if x.dim() != len(shape) or any(
                s is not None and s != d for s, d in zip(shape, x.shape, strict=True)
            ):
                want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
                raise _Corrupt(f"tensor '{name}' has shape {list(x.shape)}, expected {want}")
            return x

        tok = need("tokens", (1,), torch.float64)
        if int(tok.item()) != T:
            raise _Corrupt(f"tensor 'tokens' says {int(tok.item())}, metadata {T}")
        for name in SUM_TENSORS:
            need(name, (L, E), torch.float64)
        if not any(n in t for n in (*PREMOE_TENSORS, *PREMOE_BOUNDED)):
            raise _Corrupt("it holds no PreMoe statistic (neither 'premoe_hist_f' nor 'premoe_q')")
        ka = None
        if any(n in t for n in PREMOE_TENSORS):  # the exact per-token entries
            ka = need("premoe_idx", (L, T, None), torch.int32).shape[-1]
            for name, dtype in PREMOE_TENSORS.items():
                need(name, (L, T, ka), dtype)
            idx = t["premoe_idx"]
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= E):
                raise _Corrupt(f"tensor 'premoe_idx' holds expert ids outside 0..{E - 1}")
        if any(n in t for n in PREMOE_BOUNDED):  # the bounded statistics
            stored = int(need("premoe_ka", (1,), torch.int64).item())
            if not 1 <= stored <= E or (ka is not None and stored != ka):
                raise _Corrupt(f"tensor 'premoe_ka' says {stored}, expected 1..{E} (and the entries' Ka)")
            B = need("premoe_edges", (None,), torch.float64).shape[0]
            edges = t["premoe_edges"]
            if B < 2 or bool((edges.diff() < 0).any()) or float(edges[0]) != 0.0 or float(edges[-1]) != 1.0:
                raise _Corrupt("tensor 'premoe_edges' is not an ascending list of bin edges from 0 to 1")
            for name in PREMOE_HIST_TENSORS:
                need(name, (L, E, B), torch.float64)
            need("premoe_qmax", (L,), torch.float64)
            entries = t["premoe_hist_n"].sum(dim=(1, 2))
            if bool((entries != T * stored).any()):
                raise _Corrupt(f"tensor 'premoe_hist_n' counts {entries.tolist()} entries per layer, not {T * stored}")
            if bool((t["premoe_qmax"] > T * (1 + 1e-6)).any()):
                raise _Corrupt(f"tensor 'premoe_qmax' exceeds the {T} tokens")
        need("mone_mean", (L, E, H), torch.float32)
        need("mone_m2", (L, E, H), torch.float32)
        if any(n in t for n in LSQ_TENSORS):
            need("gate_sq", (L, E), torch.float64)
            need("novice_lsq", (L, E, H), torch.float32)
        if "sample_gate" in t:
            need("sample_gate", (S, L, E), torch.float32)
        if "sample_premoe" in t:
            need("sample_premoe", (S, E), torch.float64)
        if "sample_tokens" in t:  # absent in profiles written before it was added
            lengths = need("sample_tokens", (S,), torch.int64)
            if int(lengths.sum()) != T or bool((lengths < 0).any()):
                raise _Corrupt(
                    f"tensor 'sample_tokens' sums to {int(lengths.sum())}, metadata says {T} tokens"
                )
        unknown = set(t) - {
            "tokens", "mone_mean", "mone_m2", "sample_gate", "sample_tokens", "sample_premoe", *SUM_TENSORS,
            *LSQ_TENSORS, *PREMOE_TENSORS, *PREMOE_BOUNDED,
        }  # fmt: skip
        if unknown:
            raise _Corrupt(f"unknown tensors {sorted(unknown)}")
        self._check_values(T)

    def _where(self, name: str, bad: torch.Tensor) -> str:
        """Where the first True of ``bad`` (shaped like tensor ``name``) is, for messages."""
        pos = [int(v) for v in bad.nonzero()[0].tolist()]
        layers = self.layers

        def layer(i: int) -> str:
            return f"MoE layer {layers[i]}" if 0 <= i < len(layers) else f"layer position {i}"

        if name == "sample_gate":
            return f"at sample {pos[0]}, {layer(pos[1])}, expert {pos[2]}"
        if name == "sample_premoe":
            return f"at sample {pos[0]}, expert {pos[1]}"
        if name in ("premoe_q", "premoe_f"):
            return f"at {layer(pos[0])}, token {pos[1]}"
        if name == "premoe_qmax":
            return f"at {layer(pos[0])}"
        if len(pos) >= 2 and name != "premoe_edges":
            return f"at {layer(pos[0])}, expert {pos[1]}"
        return f"at index {pos}"

    def _check_values(self, T: int) -> None:
        """NaN/Inf anywhere, and values no calibration produces (negative sums of non-negative
        terms, fractional counts, counts above the token count)."""
        for name, x in self.tensors.items():
            if not x.is_floating_point():
                continue
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                raise _Corrupt(f"tensor '{name}' holds NaN or infinite values {self._where(name, bad)}")
            if name in NON_NEGATIVE:
                bad = x < 0
                if bool(bad.any()):
                    raise _Corrupt(f"tensor '{name}' holds negative values {self._where(name, bad)}")
            if name in INTEGRAL:
                bad = x != x.round()
                if bool(bad.any()):
                    raise _Corrupt(f"tensor '{name}' holds non-integral counts {self._where(name, bad)}")
        bad = self.tensors["count"] > T
        if bool(bad.any()):
            where = self._where("count", bad)
            raise _Corrupt(f"tensor 'count' exceeds the {T} calibration tokens {where}")

    # --- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the profile atomically (temporary file beside it, then rename)."""
        from safetensors.torch import save_file

        self.validate()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        meta_text = json.dumps({**self.meta, "format": FORMAT}, sort_keys=True)
        metadata = {"meta": meta_text, CHECKSUM_KEY: json.dumps(checksums(tensors, meta_text), sort_keys=True)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        self.path = str(path)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read and validate a profile; a missing, corrupted or foreign file is a UserError."""
        from safetensors import safe_open

        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(
                f"profile '{path}' does not exist", "create it with `moeprune profile MODEL --data ...`"
            )
        try:
            with safe_open(str(p), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            first = (str(exc).splitlines() or [exc.__class__.__name__])[0][:160]
            raise UserError(
                f"'{path}' is not a readable safetensors file ({first})",
                "pass a profile written by `moeprune profile` (the file may be truncated or corrupted)",
            ) from None
        try:
            meta = json.loads(header["meta"])
            if not isinstance(meta, dict):
                raise ValueError
        except (KeyError, ValueError, TypeError):
            raise UserError(
                f"'{path}' is a safetensors file but not a moeprune profile (no profile metadata)",
                "pass a profile written by `moeprune profile`",
            ) from None
        if meta.get("format") not in (FORMAT, *OLD_FORMATS):
            raise UserError(
                f"'{path}' has format '{meta.get('format')}', not '{FORMAT}'",
                "re-create the profile with this version of moeprune",
            )
        if meta["format"] == FORMAT:
            _verify_checksums(str(path), header, tensors)
        else:
            # Older profiles carry no checksum; refusing them would force a new calibration pass,
            # so they are read (and fully validated) with a warning.
            print(
                f"moeprune: warning: profile '{path}' ({meta['format']}) has no checksum, so corruption "
                "cannot be detected; `moeprune profile merge` or a new profile writes one",
                file=sys.stderr,
            )
        prof = cls(meta=meta, tensors=tensors, path=str(path))
        prof.validate()
        return prof

    # --- model identity ---------------------------------------------------------------------

    def check_model(
        self,
        config: Any,
        model_name: str | None = None,
        blocks: Sequence[Any] | None = None,
        router_sha256: str | None = None,
    ) -> None:
        """Refuse a model whose expert layout differs from the one this profile was made on, or,
        when both are known, whose router weights differ (``router_sha256``)."""
        from .identity import KEY, check_router

        fields = fingerprint_fields(config, blocks)
        if model_fingerprint(fields) == self.meta["model_fingerprint"]:
            check_router(
                self.meta.get(KEY),
                router_sha256,
                f"profile '{self.name}'",
                "profile this model first with `moeprune profile`",
            )
            return
        mine = self._fields()
        raise UserError(
            f"profile '{self.name}' was made on model '{self.meta['model']}' ({_describe(mine)}), "
            f"which is not model '{model_name or '?'}' ({_describe(fields)})",
            "profile this model first with `moeprune profile`",
        )

    def plan(self, method: str, keep: int | float | str, **options: Any) -> Any:
        """The :class:`~moeprune.plan.Plan` of this profile: :func:`moeprune.api.plan` (same options)."""
        from .api import plan

        return plan(self, method, keep, **options)

    # --- merging ----------------------------------------------------------------------------

    @classmethod
    def merge(cls, profiles: Sequence[Profile]) -> Profile:
        """The profile of the union of the profiles' data (same model; order kept)."""
        from .calibrate import chan_merge, lsq_novices
        from .identity import KEY, check_router

        if len(profiles) < 2:
            raise UserError("merging needs at least two profiles", "pass two or more profile files")
        first = profiles[0]
        for p in profiles[1:]:
            if p.meta["model_fingerprint"] != first.meta["model_fingerprint"]:
                raise UserError(
                    f"profiles '{first.name}' (model '{first.meta['model']}', {_describe(first._fields())}) and "
                    f"'{p.name}' (model '{p.meta['model']}', {_describe(p._fields())}) are of different models",
                    "merge only profiles of the same model",
                )
            check_router(
                first.meta.get(KEY),
                p.meta.get(KEY),
                f"profile '{p.name}'",
                "merge only profiles of the same model",
            )
            if p.premoe_ka != first.premoe_ka:
                raise UserError(
                    f"profiles '{first.name}' and '{p.name}' kept different PreMoe candidate counts "
                    f"(--premoe-ka {first.premoe_ka} vs {p.premoe_ka})",
                    "re-create them with the same --premoe-ka",
                )
        out: dict[str, torch.Tensor] = {
            "tokens": sum((p["tokens"] for p in profiles[1:]), profiles[0]["tokens"].clone())
        }
        for name in SUM_TENSORS:
            if name == "count":
                continue
            out[name] = torch.stack([p[name] for p in profiles]).sum(0)
        n = first["count"].clone()
        mean = first["mone_mean"].double()
        m2 = first["mone_m2"].double()
        for p in profiles[1:]:
            n, mean, m2 = chan_merge(n, mean, m2, p["count"], p["mone_mean"].double(), p["mone_m2"].double())
        out["count"] = n
        empty = (n == 0).unsqueeze(-1)
        out["mone_mean"] = mean.masked_fill(empty, 0.0).float()
        out["mone_m2"] = m2.masked_fill(empty, 0.0).float()
        if all("novice_lsq" in p.tensors for p in profiles):  # Σ g²-weighted mean of the novices
            gate_sq = torch.stack([p["gate_sq"] for p in profiles]).sum(0)
            num = sum(p["gate_sq"].unsqueeze(-1) * p["novice_lsq"].double() for p in profiles)
            out["gate_sq"] = gate_sq
            out["novice_lsq"] = lsq_novices(num, gate_sq).float()
        if all(p.premoe_exact for p in profiles):
            for name in PREMOE_TENSORS:
                out[name] = torch.cat([p[name] for p in profiles], dim=1)
        out.update(_merge_premoe_bounded(profiles))
        if all("sample_tokens" in p.tensors for p in profiles):
            out["sample_tokens"] = torch.cat([p["sample_tokens"] for p in profiles])
            if all("sample_premoe" in p.tensors for p in profiles):
                out["sample_premoe"] = torch.cat([p["sample_premoe"] for p in profiles])
        per_sample = all("sample_gate" in p.tensors for p in profiles)
        if per_sample:
            out["sample_gate"] = torch.cat([p["sample_gate"] for p in profiles], dim=0)
        meta = dict(first.meta)
        meta["format"] = FORMAT
        meta["tokens"] = sum(p.tokens for p in profiles)
        meta["samples"] = sum(p.samples for p in profiles)
        meta["data"] = [d for p in profiles for d in p.meta["data"]]
        meta["settings"] = {
            "premoe_ka": first.premoe_ka,
            "premoe_exact": "premoe_q" in out,
            "per_sample": per_sample,
            "merged_from": [{"path": p.path, "settings": p.meta["settings"]} for p in profiles],
        }
        from . import __version__

        meta["tool_version"] = __version__
        prof = cls(meta=meta, tensors=out)
        prof.validate()
        return prof

    def bounded(self) -> Profile:
        """This profile without PreMoe's per-token entries (histograms computed from them when the
        profile has none): the size no longer grows with the tokens; PreMoe then scores at the
        stored K_a only."""
        tensors = {k: v for k, v in self.tensors.items() if k not in PREMOE_TENSORS}
        if "premoe_hist_f" not in tensors:
            from .score import premoe_entries

            tensors.update(premoe_histograms(*premoe_entries(self), self.num_experts))
            if "sample_tokens" in tensors:
                tensors["sample_premoe"] = sample_premoe_from_entries(
                    *premoe_entries(self), tensors["sample_tokens"], self.num_experts
                )
        meta = {**self.meta, "format": FORMAT, "settings": {**self.meta["settings"], "premoe_exact": False}}
        prof = Profile(meta=meta, tensors=tensors, path=None)
        prof.validate()
        return prof

    def summary(self) -> str:
        return (
            f"{self.tokens:,} tokens from {self.samples:,} samples, {self.num_layers} MoE layers x "
            f"{self.num_experts} experts (model '{self.meta['model']}')"
        )


# --- PreMoe's bounded statistics -----------------------------------------------------------------


def _merge_premoe_bounded(profiles: Sequence[Profile]) -> dict[str, torch.Tensor]:
    """Histograms add and Σ max q adds; profiles with only per-token entries get their histograms
    from them first. Different bin edges cannot be added: refuse."""
    from .score import premoe_entries

    parts = []
    for p in profiles:
        if "premoe_hist_f" in p.tensors:
            parts.append({k: p[k] for k in PREMOE_BOUNDED})
        else:
            parts.append(premoe_histograms(*premoe_entries(p), p.num_experts))
    first = parts[0]
    for p, part in zip(profiles[1:], parts[1:], strict=True):
        if not torch.equal(part["premoe_edges"], first["premoe_edges"]):
            raise UserError(
                f"profiles '{profiles[0].name}' and '{p.name}' use different PreMoe histogram bins",
                "re-create them with the same version of moeprune",
            )
    out = {name: torch.stack([part[name] for part in parts]).sum(0) for name in (*PREMOE_HIST_TENSORS, "premoe_qmax")}
    out["premoe_edges"] = first["premoe_edges"].clone()
    out["premoe_ka"] = first["premoe_ka"].clone()
    return out


def premoe_histograms(
    q: torch.Tensor, f: torch.Tensor, idx: torch.Tensor, num_experts: int, bins: int | None = None
) -> dict[str, torch.Tensor]:
    """The bounded PreMoe tensors of per-token entries (q, f, idx) [L, T, Ka] (what calibration
    accumulates on the fly)."""
    from .score import PREMOE_BINS, premoe_bins, premoe_edges

    L, _, ka = q.shape
    edges = premoe_edges(int(ka), bins or PREMOE_BINS)
    B = edges.numel()
    q64, f64 = q.double(), f.double()
    hist = torch.zeros(L, 3, num_experts * B, dtype=torch.float64)
    for li in range(L):
        cell = idx[li].long().reshape(-1) * B + premoe_bins(q64[li], edges).reshape(-1)
        vals = torch.stack([f64[li].reshape(-1), (q64[li] * f64[li]).reshape(-1), torch.ones(cell.numel(), dtype=torch.float64)])
        hist[li].index_add_(1, cell, vals)
    hist = hist.view(L, 3, num_experts, B)
    out = {name: hist[:, j].contiguous() for j, name in enumerate(PREMOE_HIST_TENSORS)}
    out["premoe_edges"] = edges
    out["premoe_qmax"] = q64[:, :, 0].sum(1)
    out["premoe_ka"] = torch.tensor([int(ka)], dtype=torch.int64)
    return out


def sample_premoe_from_entries(
    q: torch.Tensor, f: torch.Tensor, idx: torch.Tensor, lengths: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Per record, Σ over its tokens of PreMoe's PEU terms at the first MoE layer with the
    record's own r (mean max q over its tokens) [S, E] float64: what calibration accumulates."""
    from .score import premoe_scores

    rows, start = [], 0
    for n in lengths.tolist():
        sl = slice(start, start + n)
        if n > 0:
            rows.append(premoe_scores(q[:1, sl], f[:1, sl], idx[:1, sl], num_experts)[0] * n)
        else:
            rows.append(torch.zeros(num_experts, dtype=torch.float64))
        start += n
    return torch.stack(rows) if rows else torch.zeros(0, num_experts, dtype=torch.float64)
