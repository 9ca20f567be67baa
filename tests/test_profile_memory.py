"""Memory of the offloaded profile in bfloat16 (issue 17, gpt-oss width): no tensor of the profile
step may hold every expert's output for every token ([tokens, E, hidden]).

Peak RSS is what the benchmark measures, but it depends on the allocator and the machine; here the
size of every tensor torch creates is recorded (a dispatch mode sees each op's outputs), which is
deterministic. A per-token all-experts tensor of this model is tokens x E x hidden x 2 bytes; the
largest tensor allowed is a per-expert weight (stored or dequantized) or a per-token tensor of the
selected experts only (tokens x top-k x hidden, in float64 for the statistics)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeprune.offload import calibrate_sequential
from moeprune.score import PREMOE_BINS, premoe_edges
from moeprune.testing.quantized import random_mxfp4


class _Largest(TorchDispatchMode):
    """Records the byte size of the largest new tensor any op returns (views of an input, such
    as the stored layer's tensors sliced as read, allocate nothing and are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        held = {a.untyped_storage().data_ptr() for a in inputs if not a.is_meta}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in held:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _gpt_oss(tmp_path, hidden: int, experts: int):
    from transformers import GptOssConfig

    cfg = GptOssConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=hidden, num_local_experts=experts,
        num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        sliding_window=128, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
    )  # fmt: skip
    out = tmp_path / f"gpt-oss-{hidden}-{experts}"
    random_mxfp4(cfg, out)
    return out


def test_bf16_offloaded_profile_builds_no_all_experts_tensor(tmp_path):
    hidden, experts, tokens, k = 256, 128, 400, 4
    model = _gpt_oss(tmp_path, hidden, experts)
    seqs = [[(7 * j + r) % 100 for j in range(tokens // 2)] for r in range(2)]
    mode = _Largest()
    with mode:
        calibrate_sequential(model, seqs, batch_size=2, dtype=torch.bfloat16)
    all_experts = tokens * experts * hidden * 2  # [tokens, E, H] bf16: 26 MB here
    # the largest legitimate tensors: one expert's gate_up dequantized in float32 on the way
    # ([2H, H] x 4 bytes x 2 for the interleaved stack), the [tokens, k, H] outputs in float64
    per_expert = 2 * hidden * hidden * 4 * 2
    per_token = tokens * k * hidden * 8
    # the accumulator's PreMoe histograms [L, 3, E x bins] float64: fixed, not per token
    stats = 2 * 3 * experts * premoe_edges(k, PREMOE_BINS).numel() * 8
    bound = max(per_expert, per_token, stats)
    assert bound < all_experts / 4  # the test can tell the two apart at this size
    assert mode.largest <= bound, (mode.largest, bound, all_experts)
