"""Hugging Face models under DHP (extra ``hf``: transformers >= 5.18, < 6).

``HFModule(model)`` trains a ``*ForCausalLM`` or a multimodal model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
InternVL, LLaVA-OneVision; ``lightning_dhp/hf/families``) under ``DHPStrategy``: text attention through
``cp_attention`` (registered with HF's AttentionInterface as ``"lightning_dhp"``), positions and labels
prepared before sharding, the vision work spread over each CP group, the loss as a share of the global batch.
``ChatDataset`` reads a chat manifest of images and videos: token counts without decoding, assistant-only labels,
and each rank decoding only the pixels it encodes.
"""

import transformers
from packaging.version import Version

# The first release whose multimodal models take precomputed vision features (``mm_encoder_outputs``).
MIN_TRANSFORMERS = "5.18"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(f"lightning_dhp.hf needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}: "
                      "pip install 'lightning-dhp[hf]'")

from lightning_dhp.hf.attention import ATTENTION_NAME, dhp_attention  # noqa: E402
from lightning_dhp.hf.chat import ChatDataset  # noqa: E402
from lightning_dhp.hf.families import SUPPORTED_MULTIMODAL  # noqa: E402
from lightning_dhp.hf.module import HFModule, default_optimizer  # noqa: E402
from lightning_dhp.hf.vision import VisionFamily  # noqa: E402

__all__ = ["ATTENTION_NAME", "SUPPORTED_MULTIMODAL", "ChatDataset", "HFModule", "VisionFamily", "default_optimizer",
           "dhp_attention"]
