"""The expert profile (``*.profile.safetensors``): what one calibration pass measured.

The format is specified in ``docs/profile-format.md``. :class:`Profile` holds the tensors and the
metadata, writes them atomically, reads and validates them (a corrupted or foreign file is a
clear :class:`~moeprune.errors.UserError`), refuses to be used with a different model
(:meth:`Profile.check_model`), and merges profiles of the same model exactly
(:meth:`Profile.merge`: sums add, MoNE mean/M2 combine with Chan's update, PreMoe's per-token
entries and per-sample rows concatenate in order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

__all__ = [
    "FORMAT",
    "SUM_TENSORS",
    "Profile",
    "atomic_write",
    "fingerprint_fields",
    "model_fingerprint",
]

FORMAT = "moeprune-profile/1"
SUM_TENSORS = ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1")  # [L, E] float64
PREMOE_TENSORS = {"premoe_q": torch.float32, "premoe_f": torch.float32, "premoe_idx": torch.int32}
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


def fingerprint_fields(config: Any, blocks: Sequence[Any] | None = None) -> dict[str, Any]:
    """The config facts that fix the expert layout (MoE layers found by structure, on the meta
    device when no ``blocks`` are given)."""
    if blocks is None:
        from .arch import find_moe_blocks
        from .modelio import build_on_meta

        blocks = find_moe_blocks(build_on_meta(config))
    text = config.get_text_config()
    return {
        "model_type": str(getattr(config, "model_type", None) or getattr(text, "model_type", "?")),
        "hidden_size": int(text.hidden_size),
        "num_hidden_layers": int(text.num_hidden_layers),
        "num_experts": int(blocks[0].num_experts),
        "top_k": int(blocks[0].top_k),
        "moe_layers": [int(b.layer) for b in blocks],
    }


def model_fingerprint(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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


# --- the profile -----------------------------------------------------------------------------


class _Corrupt(Exception):
    pass


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
        return int(self.tensors["premoe_idx"].shape[-1])

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.meta["layers"]]

    @property
    def name(self) -> str:
        return self.path or "<profile>"

    def __getitem__(self, name: str) -> torch.Tensor:
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
        ka = need("premoe_idx", (L, T, None), torch.int32).shape[-1]
        for name, dtype in PREMOE_TENSORS.items():
            need(name, (L, T, ka), dtype)
        need("mone_mean", (L, E, H), torch.float32)
        need("mone_m2", (L, E, H), torch.float32)
        if "sample_gate" in t:
            need("sample_gate", (S, L, E), torch.float32)
        if "sample_tokens" in t:  # absent in profiles written before it was added
            lengths = need("sample_tokens", (S,), torch.int64)
            if int(lengths.sum()) != T or bool((lengths < 0).any()):
                raise _Corrupt(
                    f"tensor 'sample_tokens' sums to {int(lengths.sum())}, metadata says {T} tokens"
                )
        unknown = set(t) - {
            "tokens", "mone_mean", "mone_m2", "sample_gate", "sample_tokens", *SUM_TENSORS, *PREMOE_TENSORS
        }  # fmt: skip
        if unknown:
            raise _Corrupt(f"unknown tensors {sorted(unknown)}")

    # --- files ------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the profile atomically (temporary file beside it, then rename)."""
        from safetensors.torch import save_file

        self.validate()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        metadata = {"meta": json.dumps(self.meta, sort_keys=True)}
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
        if meta.get("format") != FORMAT:
            raise UserError(
                f"'{path}' has format '{meta.get('format')}', not '{FORMAT}'",
                "re-create the profile with this version of moeprune",
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
        from .calibrate import chan_merge
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
        for name in PREMOE_TENSORS:
            out[name] = torch.cat([p[name] for p in profiles], dim=1)
        if all("sample_tokens" in p.tensors for p in profiles):
            out["sample_tokens"] = torch.cat([p["sample_tokens"] for p in profiles])
        per_sample = all("sample_gate" in p.tensors for p in profiles)
        if per_sample:
            out["sample_gate"] = torch.cat([p["sample_gate"] for p in profiles], dim=0)
        meta = dict(first.meta)
        meta["tokens"] = sum(p.tokens for p in profiles)
        meta["samples"] = sum(p.samples for p in profiles)
        meta["data"] = [d for p in profiles for d in p.meta["data"]]
        meta["settings"] = {
            "premoe_ka": first.premoe_ka,
            "per_sample": per_sample,
            "merged_from": [{"path": p.path, "settings": p.meta["settings"]} for p in profiles],
        }
        from . import __version__

        meta["tool_version"] = __version__
        prof = cls(meta=meta, tensors=out)
        prof.validate()
        return prof

    def summary(self) -> str:
        return (
            f"{self.tokens:,} tokens from {self.samples:,} samples, {self.num_layers} MoE layers x "
            f"{self.num_experts} experts (model '{self.meta['model']}')"
        )
