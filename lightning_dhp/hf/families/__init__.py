"""The multimodal model families ``HFModule`` trains, one file each (see :mod:`lightning_dhp.hf.vision`)."""

from __future__ import annotations

from transformers import PreTrainedModel

from lightning_dhp.hf.families.internvl import InternVL
from lightning_dhp.hf.families.llava_onevision import LlavaOnevision
from lightning_dhp.hf.families.qwen3_vl import Qwen3VL
from lightning_dhp.hf.families.qwen_vl import QwenVL
from lightning_dhp.hf.vision import VisionFamily

FAMILIES: tuple[type[VisionFamily], ...] = (QwenVL, Qwen3VL, InternVL, LlavaOnevision)
SUPPORTED_MULTIMODAL: tuple[str, ...] = tuple(name for family in FAMILIES for name in family.model_classes)


def family_of(model: PreTrainedModel) -> VisionFamily | None:
    """The family adapter of ``model``, or None if its class is in no family."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if names & set(family.model_classes):
            return family(model)
    return None
