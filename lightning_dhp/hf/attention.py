"""Text attention of Hugging Face models through ``cp_attention``, registered with HF's AttentionInterface.

Packing boundaries, padding and causality come from the DHP layout of the current round, never from
HF's mask functions: the implementation name below has no entry in HF's mask interface, so HF builds
no mask for it (``attention_mask`` arrives as ``None``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel

from lightning_dhp.attention import ZigzagLayout, cp_attention
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.hf.families import SUPPORTED_MULTIMODAL

ATTENTION_NAME = "lightning_dhp"
LAYOUT_KWARG = "dhp_layout"  # a model kwarg HF passes through to attention: an explicit layout (idle ranks)

SUPPORTED = ("decoder-only *ForCausalLM models with full causal attention and no attention dropout (Llama, Qwen2, "
             f"Qwen3, Gemma, Phi-3, Mistral without a sliding window, ...), and {', '.join(SUPPORTED_MULTIMODAL)}")


def dhp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF's attention signature: q ``(1, Hq, T, D)``, k/v ``(1, Hkv, T, D)``, returns ``((1, T, Hq, D), None)``."""
    unroutable = {"sliding_window": kwargs.get("sliding_window"), "softcap": kwargs.get("softcap"),
                  "s_aux (attention sinks)": kwargs.get("s_aux"), "dropout": dropout or None,
                  "is_causal=False": None if getattr(module, "is_causal", True) else True}
    used = [name for name, value in unroutable.items() if value is not None]
    if used:
        raise DHPConfigError(f"{type(module).__name__} asks for attention with {', '.join(used)}, which "
                             "cp_attention cannot compute (it runs full causal attention over packed samples); "
                             f"supported: {SUPPORTED}")
    if query.shape[0] != 1:
        raise DHPConfigError(f"{type(module).__name__}: DHP runs one packed row per step, got a batch of "
                             f"{query.shape[0]}; pass input_ids of shape (1, tokens)")
    layout: ZigzagLayout | None = kwargs.get(LAYOUT_KWARG)
    out = cp_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), layout,
                       scale=scaling)
    return out[None], None


AttentionInterface.register(ATTENTION_NAME, dhp_attention)


def check_routable(model: PreTrainedModel, text_config: PretrainedConfig) -> None:
    """Raise :class:`DHPConfigError` naming the model class if its text attention cannot run on cp_attention."""
    name = type(model).__name__
    problems = []
    if getattr(model.config, "is_encoder_decoder", False):
        problems.append("it is an encoder-decoder model")
    if not getattr(model, "_supports_attention_backend", False):
        problems.append("its attention does not go through transformers' AttentionInterface")
    if getattr(text_config, "sliding_window", None) is not None:
        problems.append(f"sliding-window attention (sliding_window={text_config.sliding_window}; set it to None "
                        "if every sample is shorter than the window)")
    layer_types = getattr(text_config, "layer_types", None) or ()
    linear = [index for index, kind in enumerate(layer_types) if kind == "linear_attention"]
    if linear:
        problems.append(f"its language model has linear-attention (GatedDeltaNet) layers {linear}, which need a "
                        "context-parallel algorithm of their own")
    elif any(kind != "full_attention" for kind in layer_types):
        problems.append(f"layer types {sorted(set(layer_types))}")
    if getattr(text_config, "attn_logit_softcapping", None) is not None:
        problems.append(f"soft-capped attention logits (attn_logit_softcapping={text_config.attn_logit_softcapping})")
    if getattr(text_config, "attention_dropout", 0.0):
        problems.append(f"attention dropout {text_config.attention_dropout} (set attention_dropout=0.0)")
    if problems:
        raise DHPConfigError(f"{name} cannot run its attention through DHP's cp_attention: {'; '.join(problems)}. "
                             f"Supported: {SUPPORTED}")
