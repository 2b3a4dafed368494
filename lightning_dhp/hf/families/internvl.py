"""InternVL (``InternVLForConditionalGeneration``, the InternVL3 "-hf" checkpoints; Qwen2/Qwen3 language model,
1-D RoPE): ``pixel_values`` ``(tiles, 3, H, W)`` holds every image tile and video frame in token order, each
``image_seq_length`` placeholder tokens after pixel shuffle. Tiles and frames are independent images to the
vision tower, so each is a unit of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lightning_dhp.hf.vision import VisionFamily, VisionUnit, encoding_cost, runs


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


class InternVL(VisionFamily):
    """Items: ``input_ids`` and ``pixel_values`` as InternVL's processor returns them."""

    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    pixel_keys: ClassVar[dict[str, str]] = {"image": "pixel_values"}  # the processor merges video frames in

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        vision = self.config.vision_config
        (height, width), (patch_height, patch_width) = _pair(vision.image_size), _pair(vision.patch_size)
        self.tile_shape = (vision.num_channels, height, width)
        self.patches_per_tile = (height // patch_height) * (width // patch_width)
        self.tokens_per_tile = int(self.patches_per_tile * self.config.downsample_ratio**2)

    def check(self, item: dict[str, Any], token_types: torch.Tensor) -> None:
        pixels = item.get("pixel_values")
        tiles = 0 if pixels is None else len(pixels)
        if pixels is not None and tuple(pixels.shape[1:]) != self.tile_shape:
            raise ValueError(f"pixel_values has tiles of shape {tuple(pixels.shape[1:])} but this vision tower takes "
                             f"{self.tile_shape}; process the item with this model's processor")
        found = [end - start for start, end in runs(token_types == 1)]
        if sum(found) != tiles * self.tokens_per_tile or any(length % self.tokens_per_tile for length in found):
            raise ValueError(
                f"image tokens do not match pixel_values: the sample has runs of image tokens (id "
                f"{self.token_ids['image']}) of lengths {found}, but its {tiles} tiles/frames need "
                f"{self.tokens_per_tile} tokens each ({tiles * self.tokens_per_tile} in all, every run a whole number "
                "of tiles); build the item with the model's processor")

    def sample_units(self, batch: dict[str, Any], sample: int, split_videos: bool) -> list[VisionUnit]:
        pixels = batch["pixel_values"][sample]
        tiles = 0 if pixels is None else len(pixels)
        return [VisionUnit(sample, "image", tile * self.tokens_per_tile, self.tokens_per_tile, tile, 1,
                           encoding_cost(self.patches_per_tile)) for tile in range(tiles)]

    def encode(self, model: PreTrainedModel, kind: str, pixels: torch.Tensor, units: Sequence[VisionUnit],
               batch: dict[str, Any]) -> torch.Tensor:
        return model.model.get_image_features(pixel_values=pixels).pooler_output.flatten(0, 1)

    def encoder_outputs(self, features: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"image": BaseModelOutputWithPooling(pooler_output=features["image"])}

    def vision_patches(self, item: dict[str, Any]) -> int:
        pixels = item.get("pixel_values")
        return 0 if pixels is None else len(pixels) * self.patches_per_tile
