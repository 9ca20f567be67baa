"""Multimodal wrappers around an MoE language model (``*ForConditionalGeneration``).

A checkpoint such as Qwen3-VL-MoE, Llama-4 (Scout/Maverick) or Kimi-K2.5 holds a vision (or
audio) tower, a projector and an MoE language model, saved by the wrapper class with the language
model's keys under a prefix (``model.language_model.layers.N...``; Llama-4:
``language_model.model.layers.N...``). moeprune profiles and prunes the language model's routed
experts and copies every other tensor unchanged, so the pruned checkpoint loads with the same stock
wrapper class (and ``AutoModelForImageTextToText`` where transformers maps the type there).

The wrapper is built as itself (:func:`model_class`), never as its text-only causal LM, so that
checkpoint keys, weight conversions and ``from_pretrained`` all see the layout the checkpoint was
saved in. The language model's decoder layers are found at the path in :data:`WRAPPED` (a vision
tower can hold a ``layers`` list as long as the text model's). The routing family is the text
model's (``config.get_text_config().model_type`` in :data:`.table.ARCH_TABLE`).

Wrappers listed in :data:`WRAPPER_REFUSED` contain routed experts that moeprune does not prune,
with the reason. A wrapper whose language model is a refused text type is refused for that type's
reason (:data:`.table.UNSUPPORTED`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError


@dataclass(frozen=True)
class Wrapped:
    """A stock wrapper class and where its language model's decoder layers are."""

    cls: str  # class name in transformers
    layers: str  # module path of the language model's decoder layers
    text_attr: str = "text_config"  # sub-config holding the language model's counts


_LM = "model.language_model.layers"

# wrapper model_type -> the stock class and its language model (transformers 5.25; the text type's
# routing family is in ARCH_TABLE).
WRAPPED: dict[str, Wrapped] = {
    "dots3_note": Wrapped("Dots3NoteForConditionalGeneration", _LM),
    "gemma4": Wrapped("Gemma4ForConditionalGeneration", _LM),
    "glm4v_moe": Wrapped("Glm4vMoeForConditionalGeneration", _LM),
    "glm5_next": Wrapped("Glm5NextForConditionalGeneration", _LM),
    "hy_v4_vl": Wrapped("HYV4VLForConditionalGeneration", _LM),
    "mistral_large4": Wrapped("MistralLarge4ForConditionalGeneration", _LM),
    "inkling2": Wrapped("Inkling2ForConditionalGeneration", _LM),
    "inkling2_loop": Wrapped("Inkling2LoopForConditionalGeneration", _LM),
    "inkling_mm_model": Wrapped("InklingForConditionalGeneration", _LM),
    "kimi_k25": Wrapped("Kimi_K25ForConditionalGeneration", _LM),
    "llama4": Wrapped("Llama4ForConditionalGeneration", "language_model.model.layers"),
    "muse_spark": Wrapped("MuseSparkForConditionalGeneration", _LM),
    "nemo_speechlm": Wrapped("Nemotron3_5TranscribeForConditionalGeneration", _LM),
    "minimax_m3_vl": Wrapped("MiniMaxM3SparseForConditionalGeneration", _LM),
    "qwen3_5_moe": Wrapped("Qwen3_5MoeForConditionalGeneration", _LM),
    "qwen3_omni_moe_thinker": Wrapped("Qwen3OmniMoeThinkerForConditionalGeneration", _LM),
    "qwen3_vl_moe": Wrapped("Qwen3VLMoeForConditionalGeneration", _LM),
    "qwen4_exp": Wrapped("Qwen4ExpForConditionalGeneration", _LM),
    "step3p7": Wrapped("Step3p7ForConditionalGeneration", _LM),
    "deepseek_ocr2": Wrapped("DeepseekOcr2ForConditionalGeneration", _LM),
    "unlimited_ocr": Wrapped("UnlimitedOcrForConditionalGeneration", _LM),
}

# Wrappers with routed experts that moeprune refuses, and why (their text types may be refused too:
# those reasons are in UNSUPPORTED).
WRAPPER_REFUSED: dict[str, str] = {
    "ernie4_5_vl_moe": "each MoE layer holds two expert sets, text experts run on text tokens "
    "and vision experts on image tokens, sized by one num_experts: pruning the text experts forces "
    "removing as many vision experts, which a text calibration never routes to and cannot score",
    "qwen3_omni_moe": "it holds two MoE language models (the thinker and the talker, which "
    "generates speech codes from the thinker's hidden states); a text profile does not route the "
    "talker's experts: prune its thinker checkpoint (qwen3_omni_moe_thinker)",
    "nllb-moe": "an encoder-decoder translation model: its experts sit in an encoder and a decoder "
    "stack, and moeprune calibrates decoder-only causal LMs",
    "switch_transformers": "an encoder-decoder (T5) model: its experts sit in an encoder and a "
    "decoder stack, and moeprune calibrates decoder-only causal LMs",
}


def wrapped(config: Any) -> Wrapped | None:
    """The wrapper facts when ``config`` is a supported wrapper checkpoint's: its ``architectures``
    name the wrapper class, as ``save_pretrained`` writes them. None otherwise: a causal LM, or a
    composite config that names the text-only causal LM or no class at all (then built as the
    causal LM, as before wrappers were supported)."""
    mt = getattr(config, "model_type", None)
    if mt in WRAPPER_REFUSED:
        raise UserError(f"model type '{mt}' is not supported: {WRAPPER_REFUSED[mt]}",
                        "see docs/architectures.md for the supported types")
    facts = WRAPPED.get(str(mt))
    if facts is None or facts.cls not in (getattr(config, "architectures", None) or []):
        return None
    return facts


def wrapper_class(config: Any) -> type | None:
    """The stock wrapper class that builds and loads ``config``'s checkpoint, or None when the
    checkpoint is a causal LM's."""
    facts = wrapped(config)
    if facts is None:
        return None
    import transformers

    return getattr(transformers, facts.cls)


def layers_path(model: Any) -> str | None:
    """Path of the language model's decoder layers when ``model`` is a supported wrapper."""
    facts = WRAPPED.get(str(getattr(model.config, "model_type", None)))
    if facts is None or type(model).__name__ != facts.cls:
        return None
    return facts.layers
