"""Qwen3-VL (and its MoE variant): interleaved M-RoPE and DeepStack.

The processor writes a timestamp and vision start/end tokens around every temporal patch of a video, so each
video has one run of placeholder tokens per temporal patch (``get_rope_index`` treats each as its own grid).
DeepStack: the ViT blocks in ``deepstack_visual_indexes`` feed extra mergers whose features the language model
adds at the visual tokens after its first decoder layers. A unit's DeepStack rows travel with its merged
features (side by side in one tensor), and each rank hands the model the rows of the visual tokens it holds,
in its token order, so the model's own ``visual_pos_masks`` (from this rank's ``input_ids``) line up with them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from lightning_dhp.hf.families.qwen_vl import QwenVL


class Qwen3VL(QwenVL):
    """Items as Qwen3-VL's processor returns them: ``input_ids``, ``pixel_values`` + ``image_grid_thw``,
    ``pixel_values_videos`` + ``video_grid_thw``; one run of placeholder tokens per image and per video
    temporal patch."""

    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",
                                                "Qwen3VLMoeForConditionalGeneration")

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model)
        self.deepstack_layers = len(self.config.vision_config.deepstack_visual_indexes)
        self.feature_width *= 1 + self.deepstack_layers

    def expected_runs(self, kind: str, grid: torch.Tensor) -> list[int]:
        if kind == "image":
            return super().expected_runs(kind, grid)
        return [h * w // self.merge**2 for t, h, w in grid.tolist() for _ in range(t)]

    def runs_rule(self, kind: str) -> str:
        if kind == "image":
            return super().runs_rule(kind)
        return (f"h*w / spatial_merge_size**2 = {self.merge}**2 tokens per temporal patch, one run per temporal "
                "patch, each between its timestamp and vision start/end tokens")

    def features(self, output: Any) -> torch.Tensor:
        """Merged features and the DeepStack rows side by side: ``(tokens, hidden * (1 + deepstack layers))``."""
        return torch.cat([torch.cat(output.pooler_output)] + [torch.cat(rows) for rows in output.deepstack_features],
                         dim=1)

    def encoder_outputs(self, features: dict[str, torch.Tensor]) -> dict[str, Any]:
        hidden = self.feature_width // (1 + self.deepstack_layers)
        return {kind: BaseModelOutputWithDeepstackFeatures(
                    pooler_output=(rows[:, :hidden],),
                    deepstack_features=[(rows[:, hidden * layer:hidden * (layer + 1)],)
                                        for layer in range(1, 1 + self.deepstack_layers)])
                for kind, rows in features.items()}
