"""Ragged and novice checkpoints that plain transformers loads with ``trust_remote_code=True``.

A checkpoint stock transformers cannot build (:func:`moeprune.load.needs_moeprune_load`) gets:

- ``model_type: moeprune_<base>`` in ``config.json`` and ``architectures: [MoepruneForCausalLM]``,
  so that transformers without ``trust_remote_code`` refuses it (an unknown model type) instead
  of loading it into the stock class, which fails on the shapes or, with
  ``ignore_mismatched_sizes``, runs re-initialised experts;
- where the loader below is exact (:func:`remote_code_problem` is None): the file
  ``modeling_moeprune.py`` (this package's template, self-contained: torch + transformers) and an
  ``auto_map`` naming it, plus ``config.moeprune["serve"]``: every tensor shape and cached count
  that :func:`moeprune.arch.pruned.apply_layout` changes on the stock model, read off a meta build
  when the checkpoint is written. The template replays exactly those changes, so it needs no
  architecture knowledge of its own.

:func:`base_config` reads such a config back as the stock config class (what moeprune itself uses).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # surgery imports this module on the torch-free rewrite path (arch/spec.py)
    from torch import nn

TEMPLATE = Path(__file__).with_name("modeling_moeprune.py")
MODELING_FILE = TEMPLATE.name
PREFIX = "moeprune_"  # model_type of a checkpoint stock transformers must not load
ARCHITECTURE = "MoepruneForCausalLM"
SERVE_KEY = "serve"  # config.moeprune[SERVE_KEY]: what the template replays
_BASE_LINE = 'BASE_MODEL_TYPE = "deepseek_v3"'


def remote_code_problem(config: Any, raw: dict[str, Any], meta_model: nn.Module | None) -> str | None:
    """Why ``modeling_moeprune.py`` would not load this checkpoint exactly (None when it does).
    ``meta_model``: the reshaped meta build, or None for a family of
    :mod:`moeprune.arch.header_keys` (3D fused experts, no DBRX row blocks)."""
    if getattr(config, "quantization_config", None):
        return "it is quantized (transformers' own quantizers do not dequantize it as moeprune does)"
    if raw.get("auto_map"):
        return "the source model has its own remote code (auto_map)"
    if config.get_text_config() is not config:
        return "its config nests a text config (multimodal), which the loader does not rename"
    if meta_model is None:
        return None
    from ..arch.dbrx import is_row_blocked_experts
    from ..arch.pruned import NoviceExperts

    for name, module in meta_model.named_modules():
        if isinstance(module, NoviceExperts) and is_row_blocked_experts(module):
            # the template computes an expert from 3D fused tensors; DBRX stores 2D row blocks
            return f"its experts module {name} stores each expert as a block of rows (DBRX)"
    return None


def serve_spec(meta_model: nn.Module, layout: Any) -> dict[str, Any]:
    """Apply ``layout`` to ``meta_model`` (a stock meta build of the written config) and record
    what changed: tensor shapes, integer attributes (cached expert counts), novice modules."""
    from ..arch.pruned import NoviceExperts, apply_layout

    def shapes() -> dict[str, list[int]]:
        named = [*meta_model.named_parameters(), *meta_model.named_buffers()]
        return {k: list(v.shape) for k, v in named}

    def ints() -> dict[str, int]:
        return {
            f"{path}.{attr}" if path else attr: v
            for path, mod in meta_model.named_modules()
            for attr, v in vars(mod).items()
            if type(v) is int
        }

    t0, a0 = shapes(), ints()
    apply_layout(meta_model, layout)
    t1, a1 = shapes(), ints()
    novices = {
        path: {
            "routed": mod.routed_experts,
            "ids": list(mod.novice_ids),
            "hidden": int(mod.get_buffer("novice_outputs").shape[-1]),
        }
        for path, mod in meta_model.named_modules()
        if isinstance(mod, NoviceExperts)
    }
    added = {f"{p}.novice_outputs" for p in novices}
    return {
        "tensors": {k: [t0[k], t1[k]] for k in t1 if k in t0 and t0[k] != t1[k]},
        "attributes": {k: [a0[k], a1[k]] for k in a1 if k in a0 and a0[k] != a1[k]},
        "novices": novices,
        "unknown_tensors": sorted(set(t1) - set(t0) - added),  # must stay empty (checked)
    }


def mark_config(new_config: dict[str, Any], base_model_type: str, spec: dict[str, Any] | None) -> None:
    """Rename the model type and, with ``spec``, name the template in ``auto_map`` (in place)."""
    from ..arch.pruned import CONFIG_KEY

    new_config[CONFIG_KEY]["base_model_type"] = base_model_type
    new_config[CONFIG_KEY]["base_architectures"] = new_config.get("architectures")
    new_config["model_type"] = PREFIX + base_model_type
    new_config["architectures"] = [ARCHITECTURE]
    if spec is not None:  # in key order: the same file whichever way the spec was found
        new_config[CONFIG_KEY][SERVE_KEY] = {k: dict(sorted(v.items())) for k, v in spec.items()}
        new_config["auto_map"] = {
            "AutoConfig": "modeling_moeprune.MoepruneConfig",
            "AutoModelForCausalLM": f"modeling_moeprune.{ARCHITECTURE}",
        }


def write_modeling_file(folder: Path, base_model_type: str) -> None:
    """``modeling_moeprune.py`` for a checkpoint of ``base_model_type``."""
    text = TEMPLATE.read_text(encoding="utf-8")
    if text.count(_BASE_LINE) != 1:
        raise AssertionError(f"{TEMPLATE} lost its line {_BASE_LINE!r}")
    text = text.replace(_BASE_LINE, f'BASE_MODEL_TYPE = "{base_model_type}"')
    (folder / MODELING_FILE).write_text(text, encoding="utf-8")


def base_model_type(raw: dict[str, Any]) -> str | None:
    """The stock model type of a config dict that moeprune renamed, else None."""
    from ..arch.pruned import CONFIG_KEY

    layout = raw.get(CONFIG_KEY)
    base = layout.get("base_model_type") if isinstance(layout, dict) else None
    if isinstance(base, str) and raw.get("model_type") == PREFIX + base:
        return base
    return None


def base_config(path: Path, raw: dict[str, Any]) -> Any:
    """The config of a renamed checkpoint, read as its stock config class (no remote code runs)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..arch.pruned import CONFIG_KEY

    base = base_model_type(raw)
    if base is None:
        raise ValueError("not a config renamed by moeprune")
    config_dict, _ = PretrainedConfig.get_config_dict(str(path), local_files_only=True)
    config_dict["model_type"] = base
    # the stock class names again: a multimodal wrapper is built as its wrapper class only when
    # its architectures name it (arch/wrappers.py)
    config_dict["architectures"] = raw[CONFIG_KEY].get("base_architectures") or config_dict.get("architectures")
    return CONFIG_MAPPING[base].from_dict(config_dict)
