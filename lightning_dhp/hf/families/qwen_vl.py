"""Qwen2-VL and Qwen2.5-VL: 3-D M-RoPE positions from the model's own ``get_rope_index`` on the whole sample;
vision units are whole images and each video temporal patch, which every Qwen-VL tower attends to as a
segment of its own (transformers' vision ``cu_seqlens`` have one segment per temporal patch; Qwen2.5-VL's
windows lie inside a frame), so a patch's features do not depend on what else is encoded with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from lightning_dhp.hf.vision import KINDS, VisionFamily, VisionUnit, encoding_cost, runs


class QwenVL(VisionFamily):
    """Items: ``input_ids``, ``pixel_values`` + ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw``
    (and ``second_per_grid_ts`` for Qwen2.5-VL), one run of placeholder tokens per image and per video."""

    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",
                                                "Qwen2_5_VLForConditionalGeneration")
    grid_keys: ClassVar[dict[str, str]] = {"image": "image_grid_thw", "video": "video_grid_thw"}
    position_rows = 3

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        vision = self.config.vision_config
        self.merge = int(vision.spatial_merge_size)
        self.patch_width = int(vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)

    def expected_runs(self, kind: str, grid: torch.Tensor) -> list[int]:
        """Placeholder tokens per run: one run per image and per video."""
        return (grid.prod(-1) // self.merge**2).tolist()

    def grid(self, item: dict[str, Any], kind: str) -> torch.Tensor:
        grid = item.get(self.grid_keys[kind])
        return torch.zeros(0, 3, dtype=torch.long) if grid is None else grid.long().reshape(-1, 3)

    def check(self, item: dict[str, Any], token_types: torch.Tensor) -> None:
        for kind_id, kind in enumerate(KINDS, start=1):
            grid_key, pixels_key = self.grid_keys[kind], self.pixel_keys[kind]
            grid = self.grid(item, kind)
            expected = self.expected_runs(kind, grid)
            found = [end - start for start, end in runs(token_types == kind_id)]
            if found != expected:
                raise ValueError(
                    f"{kind} tokens do not match {grid_key}: the sample has {len(found)} runs of {kind} tokens "
                    f"(id {self.token_ids[kind]}) of lengths {found}, but {grid_key}={grid.tolist()} needs "
                    f"{expected} ({self.runs_rule(kind)}); build the item with the model's processor")
            pixels = item.get(pixels_key)
            if pixels is not None and (pixels.dim() != 2 or pixels.shape[1] != self.patch_width):
                raise ValueError(
                    f"{pixels_key} has rows of shape {tuple(pixels.shape[1:])} but this vision tower takes patches "
                    f"of {self.patch_width} values (in_channels x temporal_patch_size x patch_size**2); process the "
                    "item with this model's processor")
            pixel_rows = 0 if pixels is None else pixels.shape[0]
            if pixel_rows != int(grid.prod(-1).sum()):
                raise ValueError(f"{pixels_key} has {pixel_rows} rows but {grid_key}={grid.tolist()} needs "
                                 f"{int(grid.prod(-1).sum())} (t*h*w patches per {kind})")
            item[grid_key] = grid
            item.setdefault(pixels_key, None)

    def runs_rule(self, kind: str) -> str:
        return f"t*h*w / spatial_merge_size**2 = {self.merge}**2 each, one run per {kind}"

    def positions(self, item: dict[str, Any], token_types: torch.Tensor) -> torch.Tensor:
        image_grid, video_grid = self.grid(item, "image"), self.grid(item, "video")
        positions, _ = self.base.get_rope_index(
            item["input_ids"][None], mm_token_type_ids=token_types[None],
            image_grid_thw=image_grid if len(image_grid) else None,
            video_grid_thw=video_grid if len(video_grid) else None,
            second_per_grid_ts=item.pop("second_per_grid_ts", None))
        return positions[:, 0].T.contiguous()

    def sample_units(self, batch: dict[str, Any], sample: int, split_videos: bool) -> list[VisionUnit]:
        units, row = [], 0
        for kind in KINDS:
            patch = 0
            for t, h, w in batch[self.grid_keys[kind]][sample].tolist():
                pieces = [(1, h, w)] * t if kind == "video" and split_videos else [(t, h, w)]
                for piece in pieces:
                    patches = piece[0] * h * w
                    units.append(VisionUnit(sample, kind, row, patches // self.merge**2, patch, patches,
                                            encoding_cost(h * w, piece[0]), piece))
                    row, patch = row + patches // self.merge**2, patch + patches
        return units

    def encode(self, model: PreTrainedModel, kind: str, pixels: torch.Tensor, units: Sequence[VisionUnit],
               batch: dict[str, Any]) -> torch.Tensor:
        grids = torch.tensor([unit.info for unit in units], device=pixels.device)
        encode = model.model.get_image_features if kind == "image" else model.model.get_video_features
        return self.features(encode(pixels, grids))

    def features(self, output: Any) -> torch.Tensor:
        """The rows of the tower's output (its merged features)."""
        return torch.cat(output.pooler_output)

    def encoder_outputs(self, features: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {kind: BaseModelOutputWithPooling(pooler_output=(rows,)) for kind, rows in features.items()}

    def vision_patches(self, item: dict[str, Any]) -> int:
        return sum(int(self.grid(item, kind).prod(-1).sum()) for kind in KINDS)
