"""Hugging Face models under DHP (extra ``hf``: transformers 5).

``HFModule(model)`` trains a ``*ForCausalLM`` or a Qwen2-VL / Qwen2.5-VL model under ``DHPStrategy``:
text attention through ``cp_attention`` (registered with HF's AttentionInterface as
``"lightning_dhp"``), positions and labels prepared before sharding, the loss as a share of the
global batch.
"""

from lightning_dhp.hf.attention import ATTENTION_NAME, dhp_attention
from lightning_dhp.hf.module import HFModule, default_optimizer
from lightning_dhp.hf.qwen_vl import QwenVLItems, vision_patches

__all__ = ["ATTENTION_NAME", "HFModule", "QwenVLItems", "default_optimizer", "dhp_attention", "vision_patches"]
