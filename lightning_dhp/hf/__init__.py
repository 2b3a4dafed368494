"""Hugging Face models under DHP (extra ``hf``: transformers 5).

``HFModule(model)`` trains a ``*ForCausalLM`` or a multimodal model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
InternVL, LLaVA-OneVision; ``lightning_dhp/hf/families``) under ``DHPStrategy``: text attention through
``cp_attention`` (registered with HF's AttentionInterface as ``"lightning_dhp"``), positions and labels
prepared before sharding, the vision work spread over each CP group, the loss as a share of the global batch.
"""

from lightning_dhp.hf.attention import ATTENTION_NAME, dhp_attention
from lightning_dhp.hf.families import SUPPORTED_MULTIMODAL
from lightning_dhp.hf.module import HFModule, default_optimizer
from lightning_dhp.hf.vision import VisionFamily

__all__ = ["ATTENTION_NAME", "SUPPORTED_MULTIMODAL", "HFModule", "VisionFamily", "default_optimizer",
           "dhp_attention"]
