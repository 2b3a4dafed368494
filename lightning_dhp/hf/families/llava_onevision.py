"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``; SigLIP tower, 1-D RoPE language model).

An image alone in its sample is cut into anyres crops whose features the model unpads and lays out with
newline rows across crops, so it is one unit; the images of a multi-image sample (the base crop each) form one
unit too, encoded together as the model does (``batch_num_images`` says which images get anyres crops). A
video's frames go through the tower and the 2x2 pooling independently, then one ``image_newline`` row ends
the video: each frame is a unit, the last one carrying the newline row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from lightning_dhp.hf.vision import KINDS, VisionFamily, VisionUnit, encoding_cost

VIDEO_FRAMES = "video_frames"  # frames per video of the sample, added by the item transform
IMAGE_TOKENS = "image_tokens"  # placeholder tokens per image of the sample, added by the item transform


class LlavaOnevision(VisionFamily):
    """Items as LLaVA-OneVision's processor returns them: ``input_ids``, ``pixel_values`` ``(images, crops, 3, S,
    S)`` + ``image_sizes`` + ``batch_num_images``, ``pixel_values_videos`` ``(videos, frames, 3, S, S)``."""

    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        vision = self.config.vision_config
        self.crop_size = int(vision.image_size)
        side = self.crop_size // int(vision.patch_size)
        self.patches_per_crop = side * side
        self.tokens_per_crop = self.patches_per_crop - (self.config.vision_feature_select_strategy == "default")
        self.tokens_per_frame = math.ceil(side / 2) ** 2

    def image_tokens(self, image_size: torch.Tensor, images_in_sample: int) -> int:
        """Placeholder tokens of one image: the model's own ``pack_image_features`` on meta tensors (no memory)."""
        crops = self.crops(image_size, images_in_sample)
        with torch.device("meta"):
            features = [torch.empty(crops, self.tokens_per_crop, 1)]
            packed, _ = self.base.pack_image_features(features, image_size[None], torch.empty(1),
                                                      self.config.vision_aspect_ratio)
        return packed[0].shape[0]

    def crops(self, image_size: torch.Tensor, images_in_sample: int) -> int:
        """Crops the model encodes for an image: anyres for an image alone in its sample, else the base crop."""
        if images_in_sample != 1:
            return 1
        return image_size_to_num_patches(image_size, self.config.image_grid_pinpoints, self.crop_size)

    def check(self, item: dict[str, Any], token_types: torch.Tensor) -> None:
        pixels, sizes = item.get("pixel_values"), item.get("image_sizes")
        images = 0 if pixels is None else len(pixels)
        if pixels is not None and (pixels.dim() != 5 or sizes is None or len(sizes) != images):
            raise ValueError(f"pixel_values of shape {tuple(pixels.shape)} with image_sizes "
                             f"{None if sizes is None else tuple(sizes.shape)}: the processor gives (images, crops, 3, "
                             f"{self.crop_size}, {self.crop_size}) and one (height, width) per image")
        tokens = [self.image_tokens(size, images) for size in sizes] if images else []
        expected = sum(tokens)
        if images:  # the crops the model encodes, in order: (crops, 3, S, S)
            item["pixel_values"] = torch.cat([image[:self.crops(size, images)] for image, size in zip(pixels, sizes,
                                                                                                  strict=True)])
        videos = item.get("pixel_values_videos")
        if videos is not None:
            if videos.dim() != 5:
                raise ValueError(f"pixel_values_videos has shape {tuple(videos.shape)}; the processor gives "
                                 f"(videos, frames, 3, {self.crop_size}, {self.crop_size})")
            item[VIDEO_FRAMES] = torch.full((len(videos),), videos.shape[1])
            item["pixel_values_videos"] = videos.flatten(0, 1)
        frames = item.setdefault(VIDEO_FRAMES, torch.zeros(0, dtype=torch.long))
        counts = {"image": (expected, f"{images} image(s) of sizes {[] if sizes is None else sizes.tolist()}"),
                  "video": (int((frames * self.tokens_per_frame + 1).sum()),
                            f"{len(frames)} video(s) of {frames.tolist()} frames ({self.tokens_per_frame} per frame "
                            "and one newline per video)")}
        for kind_id, kind in enumerate(KINDS, start=1):
            found = int((token_types == kind_id).sum())
            if found != counts[kind][0]:
                raise ValueError(f"{kind} tokens do not match the pixels: the sample has {found} {kind} tokens (id "
                                 f"{self.token_ids[kind]}) but {counts[kind][1]} need {counts[kind][0]}; build the "
                                 "item with the model's processor")
        item["batch_num_images"] = torch.tensor([images])
        item[IMAGE_TOKENS] = torch.tensor(tokens, dtype=torch.long)
        item["image_sizes"] = torch.zeros(0, 2, dtype=torch.long) if sizes is None else sizes

    def sample_units(self, batch: dict[str, Any], sample: int, split_videos: bool) -> list[VisionUnit]:
        units, row = [], 0
        pixels = batch["pixel_values"][sample]
        if pixels is not None:  # the item transform left the crops the model encodes, and each image's tokens
            tokens, crops = int(batch[IMAGE_TOKENS][sample].sum()), len(pixels)
            cost = encoding_cost(self.patches_per_crop, crops)
            units.append(VisionUnit(sample, "image", row, tokens, 0, crops, cost))
            row += tokens
        frame = 0
        for frames in batch[VIDEO_FRAMES][sample].tolist():
            steps = [1] * frames if split_videos else [frames]
            for index, count in enumerate(steps):
                ends_video = index == len(steps) - 1
                tokens = count * self.tokens_per_frame + ends_video
                units.append(VisionUnit(sample, "video", row, tokens, frame, count,
                                        encoding_cost(self.patches_per_crop, count), (int(ends_video),)))
                row, frame = row + tokens, frame + count
        return units

    def encode(self, model: PreTrainedModel, kind: str, pixels: torch.Tensor, units: Sequence[VisionUnit],
               batch: dict[str, Any]) -> torch.Tensor:
        if kind == "image":
            sizes = torch.cat([batch["image_sizes"][unit.sample] for unit in units]).to(pixels.device)
            numbers = torch.tensor([len(batch["image_sizes"][unit.sample]) for unit in units])
            output = model.model.get_image_features(pixels, sizes, batch_num_images=numbers)
            return torch.cat(output.pooler_output)
        starts = [sum(unit.pixels for unit in units[:index]) for index in range(len(units))]
        by_frames: dict[int, list[int]] = {}
        for index, unit in enumerate(units):
            by_frames.setdefault(unit.pixels, []).append(index)
        rows: list[torch.Tensor] = [pixels.new_zeros(0)] * len(units)
        for frames, indices in by_frames.items():  # units of as many frames: one call, one video each
            clips = torch.stack([pixels[starts[index]:starts[index] + frames] for index in indices])
            features = model.model.get_video_features(clips).pooler_output
            for clip, index in enumerate(indices):
                ends_video = units[index].info[0]
                rows[index] = features[clip] if ends_video else features[clip][:frames * self.tokens_per_frame]
        return torch.cat(rows)

    def encoder_outputs(self, features: dict[str, torch.Tensor]) -> dict[str, Any]:
        outputs = {}
        if "image" in features:
            outputs["image"] = BaseModelOutputWithPooling(pooler_output=(features["image"],))
        if "video" in features:
            outputs["video"] = BaseModelOutputWithPooling(pooler_output=features["video"][None])
        return outputs

    def vision_patches(self, item: dict[str, Any]) -> int:
        sizes = item.get("image_sizes")
        images = 0 if sizes is None or item.get("pixel_values") is None else len(sizes)
        crops = sum(self.crops(size, images) for size in sizes) if images else 0
        videos = item.get("pixel_values_videos")
        frames = 0 if videos is None else (videos.shape[0] * videos.shape[1] if videos.dim() == 5 else len(videos))
        return (crops + frames) * self.patches_per_crop
