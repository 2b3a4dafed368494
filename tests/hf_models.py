"""Tiny Hugging Face models and their data for the HF tests, and the plain single-process HF oracle.

The oracle runs the model's own forward on each sample alone with its own attention (sdpa), no
packing, no planner, no ``cp_attention``, and the same optimizer as the DHP run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from lightning_dhp.hf import HFModule

LR = 1e-2
VOCAB = 64
IMAGE, VIDEO, START, END = 60, 61, 62, 63
PATCH_DIM = 3 * 2 * 2 * 2  # channels * temporal_patch_size * patch_size**2
TEXT = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": None,
        "pad_token_id": None}


def optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=LR)


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TEXT, max_position_embeddings=256)).double()


def qwen_vl(version: str = "2") -> PreTrainedModel:
    """A tiny Qwen2-VL (or Qwen2.5-VL) built from its config, float64; GQA, head dim 8: M-RoPE sections [2, 1, 1]."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    text = TEXT | {"num_attention_heads": 2, "num_key_value_heads": 1, "rope_parameters": rope}
    vision = {"depth": 2, "hidden_size": 16, "num_heads": 2, "patch_size": 2, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "in_channels": 3}
    if version == "2":
        vision |= {"embed_dim": 16}
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision |= {"out_hidden_size": 16, "intermediate_size": 32, "window_size": 8, "fullatt_block_indexes": [1]}
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE,
                          video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    return model_class(config).double()


def vl_item(generator: torch.Generator, images: list[tuple[int, int]], video: tuple[int, int, int] | None = None,
            text: int = 6) -> dict:
    """One sample as the processor returns it: text, then per image ``START, IMAGE * n, END`` and text.

    ``images`` holds (h, w) patch grids; ``video`` a (t, h, w) grid. Labels mask the image tokens.
    """
    tokens, pixels, grids = [torch.randint(0, 56, (text,), generator=generator)], [], []
    for h, w in images:
        tokens += [torch.tensor([START] + [IMAGE] * (h * w // 4) + [END]),
                   torch.randint(0, 56, (3,), generator=generator)]
        pixels.append(torch.randn(h * w, PATCH_DIM, generator=generator))
        grids.append([1, h, w])
    item = {}
    if video is not None:
        t, h, w = video
        tokens += [torch.tensor([START] + [VIDEO] * (t * h * w // 4) + [END]),
                   torch.randint(0, 56, (4,), generator=generator)]
        item |= {"pixel_values_videos": torch.randn(t * h * w, PATCH_DIM, generator=generator),
                 "video_grid_thw": torch.tensor([[t, h, w]])}
    input_ids = torch.cat(tokens)
    labels = input_ids.masked_fill((input_ids == IMAGE) | (input_ids == VIDEO), -100)
    item |= {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None], "labels": labels}
    if images:
        item |= {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}
    return item


# 0-2 images of different grids per sample (image runs of 1-6 tokens), videos of 1-8 temporal patches
VL_LAYOUTS = [([(4, 4)], None), ([], (3, 2, 4)), ([(2, 2), (4, 6)], None), ([(6, 4)], (1, 2, 2)),
              ([(2, 6), (2, 2)], None), ([(4, 4), (4, 4)], None), ([(2, 4)], None), ([], (8, 2, 2)),
              ([(4, 6)], (4, 2, 4)), ([(2, 2)], (5, 2, 2)), ([(6, 4), (2, 6)], None), ([(4, 4)], None),
              ([(2, 2)], (2, 4, 4))]


def vl_items(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [vl_item(generator, images, video, text=4 + 3 * (index % 4))
            for index, (images, video) in enumerate(VL_LAYOUTS)]


def reference_logits(model: PreTrainedModel, item: dict) -> torch.Tensor:
    """The model's own forward (its own attention and positions) on one sample alone: ``(T, vocab)``."""
    input_ids = item["input_ids"].reshape(1, -1)
    inputs = {key: item[key] for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
              if key in item}
    if inputs:
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    return model(input_ids=input_ids, **inputs).logits[0]


def reference_loss_sum(model: PreTrainedModel, item: dict) -> tuple[torch.Tensor, int]:
    """The model's own forward on one sample; summed next-token cross-entropy and its loss tokens."""
    logits = reference_logits(model, item)
    input_ids = item["input_ids"].reshape(1, -1)
    labels = item.get("labels", input_ids).reshape(-1)
    targets = torch.cat([labels[1:], labels.new_full((1,), -100)])
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"), int((targets != -100).sum())


def reference_training(model: PreTrainedModel, items: list[dict], batches: list[list[int]], steps: int) -> dict:
    """Plain HF: per global batch, the sum of every sample's loss over the batch's loss tokens, then AdamW."""
    optim = optimizer(model.parameters())
    for batch in batches[:steps]:
        optim.zero_grad()
        sums, counts = zip(*(reference_loss_sum(model, items[index]) for index in batch), strict=True)
        (sum(sums) / sum(counts)).backward()
        optim.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def module(model: PreTrainedModel) -> HFModule:
    return HFModule(model, optimizer=optimizer)
