"""The video-digits task as a Qwen-VL processor would give it, and tiny Qwen2-VL / Qwen3-VL models.

:class:`QwenVLVideoDigits` turns each :class:`~lightning_dhp.data.VideoDigits` sample into a Qwen-VL
item: the frames become ``pixel_values_videos`` (patches in the Qwen-VL processor's order, the frame
count padded to the temporal patch size by repeating the last frame) with ``video_grid_thw``, and
the visual tokens become ``<vision_start> <video_pad> * n <vision_end>`` (for Qwen3-VL once per temporal
patch, as its processor writes them, without the timestamp text). Special token ids and patch
sizes come from the model's config, so the same data feeds a tiny model or a released checkpoint
(whose vocabulary then simply holds the task's 24 words at ids 0-23).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from lightning_dhp.data.video_digits import IMAGE_ID, TEXT_TOKENS_PER_SAMPLE, VOCAB, VideoDigits
from lightning_dhp.hf.module import HFModule

VIDEO_PAD, VISION_START, VISION_END, IMAGE_PAD = range(len(VOCAB), len(VOCAB) + 4)  # the tiny model's extra ids


TASK_TOKEN_IDS = {"image_token_id": IMAGE_PAD, "video_token_id": VIDEO_PAD, "vision_start_token_id": VISION_START,
                  "vision_end_token_id": VISION_END}


def _text_config(hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, vocab_size: int) -> dict[str, Any]:
    """A tiny Qwen-VL language model's config; M-RoPE sections T:H:W = 2:1:1."""
    head_dim = hidden_size // num_heads
    sections = [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8]
    return {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "intermediate_size": intermediate_size, "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}}


def tiny_qwen2_vl(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                  intermediate_size: int = 192, vision_hidden_size: int = 64, vision_layers: int = 2,
                  vision_heads: int = 4, patch_size: int = 4, seed: int = 0, vocab_size: int = IMAGE_PAD + 1,
                  token_ids: dict[str, int] | None = None) -> Qwen2VLForConditionalGeneration:
    """A Qwen2-VL-architecture model from a config (random init, seeded), by default with the task's vocabulary
    (``vocab_size`` and the placeholder ``token_ids`` name another tokenizer's)."""
    config = Qwen2VLConfig(
        text_config=_text_config(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size),
        vision_config={"depth": vision_layers, "embed_dim": vision_hidden_size, "hidden_size": hidden_size,
                       "num_heads": vision_heads, "patch_size": patch_size, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "in_channels": 3, "mlp_ratio": 2},
        **(token_ids or TASK_TOKEN_IDS))
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def tiny_qwen3_vl(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                  intermediate_size: int = 192, vision_hidden_size: int = 64, vision_layers: int = 2,
                  vision_heads: int = 4, patch_size: int = 4, deepstack_layers: int = 1, seed: int = 0,
                  vocab_size: int = IMAGE_PAD + 1, token_ids: dict[str, int] | None = None) -> PreTrainedModel:
    """A Qwen3-VL-architecture model from a config (random init, seeded): interleaved M-RoPE and DeepStack
    (the first ``deepstack_layers`` ViT blocks feed the first decoder layers), by default with the task's
    vocabulary (``vocab_size`` and the placeholder ``token_ids`` name another tokenizer's)."""
    text = _text_config(hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, vocab_size)
    text["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(
        text_config=text | {"head_dim": hidden_size // num_heads},
        vision_config={"depth": vision_layers, "hidden_size": vision_hidden_size, "out_hidden_size": hidden_size,
                       "intermediate_size": 2 * vision_hidden_size, "num_heads": vision_heads,
                       "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                       "num_position_embeddings": 16, "deepstack_visual_indexes": list(range(deepstack_layers))},
        **(token_ids or TASK_TOKEN_IDS))
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config)


def patchify(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, C, H, W)`` frames to Qwen-VL ``pixel_values`` rows and their ``(t, h, w)`` grid (processor order:
    each ``merge x merge`` window of patches consecutive)."""
    if len(frames) % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - len(frames) % temporal, -1, -1, -1)])
    steps, channels, height, width = frames.shape
    grid = (steps // temporal, height // patch, width // patch)
    patches = frames.reshape(grid[0], temporal, channels, grid[1] // merge, merge, patch, grid[2] // merge, merge,
                             patch).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid[0] * grid[1] * grid[2], -1), torch.tensor([grid])


class QwenVLVideoDigits(Dataset):
    """``digits``' samples as Qwen-VL items for a model with ``config`` (only the answer token is labelled).

    Build ``digits`` with ``patch_size = vision patch_size * spatial_merge_size`` so its frame sizes
    are whole merged patches.
    """

    def __init__(self, digits: VideoDigits, config: PretrainedConfig) -> None:
        vision = config.vision_config
        self.digits, self.config = digits, config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        if digits.patch_size != self.patch * self.merge:
            raise ValueError(f"VideoDigits has patch_size={digits.patch_size}; this model merges {self.merge}x"
                             f"{self.merge} patches of {self.patch} px per token: build it with "
                             f"patch_size={self.patch * self.merge}")
        self.start_end_per_temporal_patch = config.model_type.startswith("qwen3_vl")
        temporal_steps = -(-digits.num_frames // self.temporal)
        wrappers = 2 * temporal_steps if self.start_end_per_temporal_patch else 2
        self.lengths: np.ndarray = temporal_steps * digits.tokens_per_frame + TEXT_TOKENS_PER_SAMPLE + wrappers

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.digits[index]
        pixels, grid = patchify(torch.stack(item["pixel_values"]), self.patch, self.merge, self.temporal)
        steps, height, width = grid[0].tolist()
        runs = [height * width // self.merge**2] * steps if self.start_end_per_temporal_patch else \
            [steps * height * width // self.merge**2]
        visual = torch.cat([torch.tensor([self.config.vision_start_token_id] + [self.config.video_token_id] * tokens +
                                         [self.config.vision_end_token_id]) for tokens in runs])
        ids = item["input_ids"][item["input_ids"] != IMAGE_ID]
        input_ids = torch.cat([ids[:3], visual, ids[3:]])
        labels = torch.full_like(input_ids, -100)
        labels[-1] = input_ids[-1]
        return {"input_ids": input_ids, "labels": labels, "pixel_values_videos": pixels, "video_grid_thw": grid}


@torch.no_grad()
def answer_accuracy(module: HFModule, dataset: QwenVLVideoDigits) -> float:
    """Fraction of samples whose answer token is the argmax at its position (teacher forcing, one process,
    one sample per forward through the model's own HF forward, on the model's device; an unsharded model)."""
    from lightning_dhp.attention import ZigzagLayout
    from lightning_dhp.distributed import CPContext, cp_context

    was_training = module.model.training
    module.model.eval()
    device = next(module.model.parameters()).device
    correct = 0
    try:
        for index in range(len(dataset)):
            item = {key: value.to(device) for key, value in dataset[index].items()}
            input_ids = item["input_ids"][None]
            with cp_context(CPContext(ZigzagLayout([input_ids.shape[1]], 1, 0), None, (0,))):
                logits = module.model(input_ids=input_ids, pixel_values_videos=item["pixel_values_videos"],
                                      video_grid_thw=item["video_grid_thw"], use_cache=False,
                                      mm_token_type_ids=2 * (input_ids == dataset.config.video_token_id)).logits
            correct += int(logits[0, -2].argmax() == input_ids[0, -1])
    finally:
        module.model.train(was_training)
    return correct / len(dataset)
