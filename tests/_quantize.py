"""Small quantized checkpoints for the load/profile/adaptive tests, with their dequantized twins.

fp8: every linear weight but the router's (and norms, embeddings, LM head) becomes float8_e4m3fn
with a float32 ``weight_scale_inv`` per block, as DeepSeek-V3 publishes; fused 3D expert tensors
get [E, rows/b0, cols/b1] scales. mxfp4: the gpt-oss experts become ``*_blocks`` / ``*_scales``.
The twin holds exactly the dequantized values (moeprune.quant), so a quantized run must equal a
run of the twin bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeprune.quant import dequantize_tensors, quant_format

_KEEP = ("norm", "embed", "lm_head", "mlp.gate.weight", "router", "e_score_correction_bias", "bias")


def _fp8(v: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    r, c = v.shape[-2:]
    nb0, nb1 = math.ceil(r / block[0]), math.ceil(c / block[1])
    pad = torch.nn.functional.pad(v.float(), (0, nb1 * block[1] - c, 0, nb0 * block[0] - r))
    blocks = pad.view(*v.shape[:-2], nb0, block[0], nb1, block[1])
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-8) / 448.0
    q = (blocks / scale[..., :, None, :, None]).view(pad.shape)[..., :r, :c]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _mxfp4(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model tensor [E, C, R] (gpt-oss keeps the transpose) -> blocks [E, R, C/32, 16], scales."""
    rows = v.transpose(-1, -2).float()  # [E, R, C]
    g = rows.reshape(*rows.shape[:-1], rows.shape[-1] // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-8) / 6.0))
    vals = g / torch.exp2(exp).unsqueeze(-1)
    idx = (vals.abs().unsqueeze(-1) - _FP4).abs().argmin(-1) | ((vals < 0).int() << 3)
    nib = idx.to(torch.uint8)
    packed = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def quantize(
    model: torch.nn.Module, out: Path, method: str = "fp8", block=(16, 16), layout: str = "hub"
) -> Path:
    """Write ``model`` quantized to ``out`` (hub layout: as save_pretrained writes it; fused: the
    model's own state dict) and its dequantized twin to ``out``-twin; returns the twin's path."""
    from moeprune.testing.tiny import byte_tokenizer

    tmp = out.parent / (out.name + "-float")
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    state = load_file(tmp / "model.safetensors") if layout == "hub" else dict(model.state_dict())
    q: dict[str, torch.Tensor] = {}
    for key, v in state.items():
        v = v.detach().contiguous()
        if (
            method == "fp8"
            and key.endswith(("weight", "_proj"))
            and v.dim() >= 2
            and not any(s in key for s in _KEEP)
        ):
            q[key], q[key + "_scale_inv"] = _fp8(v, block)
        elif method == "mxfp4" and key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q[key + "_blocks"], q[key + "_scales"] = _mxfp4(v)
        else:
            q[key] = v.to(torch.bfloat16) if v.is_floating_point() and "bias" not in key else v
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    save_file(q, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = (
        {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(block),
        }
        if method == "fp8"
        else {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"],
            "quant_method": "mxfp4",
        }
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    twin = out.parent / (out.name + "-twin")
    shutil.copytree(tmp, twin, dirs_exist_ok=True)
    for f in twin.glob("*.safetensors*"):
        f.unlink()
    fmt = quant_format(type("C", (), {"quantization_config": cfg["quantization_config"]})())
    save_file(
        dequantize_tensors(q, fmt, torch.float32), twin / "model.safetensors", metadata={"format": "pt"}
    )
    shutil.rmtree(tmp)
    return twin
