"""What a MoE model is made of, from its config alone (meta device: no weights, instant)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .arch import decoder_layers, find_moe_blocks

KEEP_FRACTIONS = (0.75, 0.5, 0.25, 0.125)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}


@dataclass
class ModelSummary:
    model_type: str
    architecture: str
    num_layers: int
    moe_layers: list[int]
    num_moe_layers: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    router: str
    group_limited: str | None
    dtype: str
    bytes_per_param: float
    total_params: int
    routed_expert_params: int
    shared_expert_params: int
    other_params: int
    params_per_expert: int
    keep: list[dict[str, Any]] = field(default_factory=list)
    # MoE layers kept whole, not counted as prunable (DeepSeek-V4's hash-routed layers)
    whole_moe_layers: list[int] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return int(self.total_params * self.bytes_per_param)

    @property
    def routed_expert_bytes(self) -> int:
        return int(self.routed_expert_params * self.bytes_per_param)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        d["routed_expert_bytes"] = self.routed_expert_bytes
        d["other_bytes"] = self.total_bytes - self.routed_expert_bytes
        return d


def _checkpoint_dtype(config: Any) -> tuple[str, float]:
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = (
            quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        )
        if method == "fp8":
            return "float8 (fp8 quantised)", 1.0
        if method in ("mxfp4",):
            return "mxfp4", 0.53  # 4-bit values + one shared scale byte per 32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    name = str(dtype).replace("torch.", "")
    return name, float(_DTYPE_BYTES.get(name, 4))


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_weights(directory: Any, model: Any, blocks: list) -> None:
    """If ``directory`` holds safetensors weights, their headers are valid and hold every MoE
    block's experts as ``model`` (built from the config) has them; a config-only folder passes."""
    from pathlib import Path

    from .arch.keys import map_expert_keys
    from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint

    directory = Path(directory)
    if not ((directory / SINGLE_NAME).is_file() or (directory / INDEX_NAME).is_file()):
        return
    map_expert_keys(model, blocks, Checkpoint.open(directory).shapes())


def summarize(config: Any, model=None, checkpoint_dir: Any = None) -> ModelSummary:
    """Summarise a MoE model given its config (building it on the meta device unless given).
    With ``checkpoint_dir``, weights found there must match the config (headers only)."""
    from .modelio import build_on_meta

    if model is None:
        model = build_on_meta(config)
    blocks = find_moe_blocks(model)
    if checkpoint_dir is not None:
        check_weights(checkpoint_dir, model, blocks)
    text = config.get_text_config()
    routed = sum(_numel(b.experts(model)) for b in blocks)
    shared = sum(_numel(model.get_submodule(p)) for b in blocks for p in b.shared_paths)
    total = sum(p.numel() for p in model.parameters())
    first = blocks[0]
    dtype, nbytes = _checkpoint_dtype(config)
    num_shared = 0
    for name in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"):
        if getattr(text, name, None):
            num_shared = int(getattr(text, name))
            break
    if not num_shared and first.shared_paths:
        num_shared = 1
    spec = first.spec
    router = f"{spec.score_fn}" + (" + selection bias" if spec.has_selection_bias else "")
    if spec.weight_from == "softmax_topk":
        router = "top-k logits -> softmax"
    if spec.selector == "sparsemixer":
        router = f"sparsemixer (top-2, threshold {spec.jitter_eps:g})"
    router += ", renormalised" if spec.renormalize else ""
    router += f", divided by their {spec.renorm_p:g}-norm" if spec.renorm_p is not None else ""
    router += f", scaled x{spec.scaling:g}" if spec.scaling != 1.0 else ""
    router += f", x a learned {spec.weight_scale.replace('_', '-')} scale" if spec.weight_scale else ""
    if spec.extra_role:  # non-prunable router columns (arch/extended.py)
        what = {
            "zero": "identity (zero) experts",
            "skip": "'skip' class (no expert)",
        }.get(spec.extra_role, "shared experts in the weights' sum")
        router += f"; {spec.extra_columns} {what}, kept"
    summary = ModelSummary(
        model_type=text.model_type,
        architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
        num_layers=len(decoder_layers(model)),  # Longcat's num_hidden_layers counts sublayers
        moe_layers=[b.layer for b in blocks],
        num_moe_layers=len(blocks),
        num_experts=first.num_experts,
        top_k=first.top_k,
        num_shared_experts=num_shared,
        router=router,
        group_limited=f"{spec.n_group} groups, top {spec.topk_group}" if spec.group_limited else None,
        dtype=dtype,
        bytes_per_param=nbytes,
        total_params=total,
        routed_expert_params=routed,
        shared_expert_params=shared,
        other_params=total - routed,
        params_per_expert=first.layout.params_per_expert(),
    )
    from .arch.variants import whole_layers

    summary.whole_moe_layers = sorted(whole_layers(model))
    for frac in KEEP_FRACTIONS:
        summary.keep.append(_keep_row(frac, first, total, routed, nbytes))
    return summary


def _keep_row(frac: float, block: Any, total: int, routed: int, nbytes: float) -> dict[str, Any]:
    """One row of the size table: the experts `moeprune plan --keep FRAC` keeps and the size then,
    or (``refused``) why plan refuses that keep for this router (sizes None)."""
    from .errors import UserError
    from .plan import check_keep, experts_to_keep

    spec = block.spec
    try:
        kept = check_keep(
            frac,
            block.num_experts,
            top_k=block.top_k,
            n_group=max(1, spec.n_group),
            topk_group=max(1, spec.topk_group),
            group_score=spec.group_score,
            can_change=(),
        )
    except UserError as exc:
        return {
            "fraction": frac,
            "experts_per_layer": experts_to_keep(frac, block.num_experts),
            "params": None,
            "bytes": None,
            "share_of_full": None,
            "refused": exc.problem,
        }
    params = total - routed + routed * kept // block.num_experts
    return {
        "fraction": frac,
        "experts_per_layer": kept,
        "params": params,
        "bytes": int(params * nbytes),
        "share_of_full": params / total,
        "refused": None,
    }
