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


def sgd(parameters) -> torch.optim.Optimizer:
    """Plain SGD, for bf16 comparisons: updates proportional to gradients (AdamW's normalised steps turn the
    rounding of near-zero gradients into sign flips)."""
    return torch.optim.SGD(parameters, lr=0.5)


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
    inputs = {key: item[key] for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                         "image_sizes", "batch_num_images") if key in item}
    if "image_grid_thw" in inputs or "video_grid_thw" in inputs:  # Qwen-VL's M-RoPE
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    return model(input_ids=input_ids, **inputs).logits[0]


def reference_loss_sum(model: PreTrainedModel, item: dict) -> tuple[torch.Tensor, int]:
    """The model's own forward on one sample; summed next-token cross-entropy and its loss tokens."""
    logits = reference_logits(model, item)
    input_ids = item["input_ids"].reshape(1, -1)
    labels = item.get("labels", input_ids).reshape(-1)
    targets = torch.cat([labels[1:], labels.new_full((1,), -100)])
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"), int((targets != -100).sum())


def reference_training(model: PreTrainedModel, items: list[dict], batches: list[list[int]], steps: int,
                       bf16_autocast: bool = False, make_optimizer=optimizer) -> dict:
    """Plain HF: per global batch, the sum of every sample's loss over the batch's loss tokens, then AdamW
    (or ``make_optimizer``; ``bf16_autocast``: the forwards under CPU bf16 autocast, as bf16-mixed runs them)."""
    optim = make_optimizer(model.parameters())
    for batch in batches[:steps]:
        optim.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
            sums, counts = zip(*(reference_loss_sum(model, items[index]) for index in batch), strict=True)
        (sum(sums) / sum(counts)).backward()
        optim.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def module(model: PreTrainedModel) -> HFModule:
    return HFModule(model, optimizer=optimizer)


# -- Qwen3-VL, InternVL and LLaVA-OneVision ------------------------------------------------------------------


def qwen3_vl() -> PreTrainedModel:
    """A tiny Qwen3-VL from its config, float64: interleaved M-RoPE, 2 DeepStack layers (after ViT blocks 0 and 1)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    text = TEXT | {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "rope_parameters": rope}
    vision = {"depth": 3, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 2,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "out_hidden_size": 16,
              "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(config).double()


def qwen3_vl_item(generator: torch.Generator, images: list[tuple[int, int]],
                  video: tuple[int, int, int] | None = None, text: int = 6) -> dict:
    """As :func:`vl_item`, with Qwen3-VL's video layout: per temporal patch a 2-token timestamp, then
    ``START, VIDEO * (h * w / 4), END``."""
    item = vl_item(generator, images, None, text)
    if video is None:
        return item
    t, h, w = video
    frames = [torch.cat([torch.randint(0, 56, (2,), generator=generator),
                         torch.tensor([START] + [VIDEO] * (h * w // 4) + [END])]) for _ in range(t)]
    input_ids = torch.cat([item["input_ids"][0], *frames, torch.randint(0, 56, (4,), generator=generator)])
    return item | {"input_ids": input_ids[None], "attention_mask": torch.ones_like(input_ids)[None],
                   "labels": input_ids.masked_fill((input_ids == IMAGE) | (input_ids == VIDEO), -100),
                   "pixel_values_videos": torch.randn(t * h * w, PATCH_DIM, generator=generator),
                   "video_grid_thw": torch.tensor([[t, h, w]])}


# images of several grids, videos of 1-6 temporal patches; the longest samples need degree 3 at 16 tokens a device
QWEN3_LAYOUTS = [([(4, 4)], None), ([], (6, 2, 4)), ([(2, 2), (4, 6)], None), ([(6, 4)], (1, 2, 2)),
                 ([], (3, 4, 4)), ([(2, 6)], (2, 2, 4)), ([(4, 4)], (5, 2, 2)), ([(2, 4)], None)]


def qwen3_vl_items(seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [qwen3_vl_item(generator, images, video, text=4 + 3 * (index % 4))
            for index, (images, video) in enumerate(QWEN3_LAYOUTS)]


TILE = 8  # tile / crop side in pixels for the tiny InternVL and LLaVA-OneVision towers (2-pixel patches)


def internvl() -> PreTrainedModel:
    """A tiny InternVL (Qwen2 language model), float64: 8x8 tiles of 2x2 patches, pixel shuffle 0.5: 4 tokens a tile."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": [TILE, TILE], "patch_size": [2, 2]}
    config = InternVLConfig(text_config={"model_type": "qwen2"} | TEXT, vision_config=vision, image_token_id=IMAGE,
                            downsample_ratio=0.5, vision_feature_layer=-1)
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(config).double()


def internvl_items(seed: int = 0) -> list[dict]:
    """Images of 1-5 tiles (``START, IMAGE * 4 * tiles, END``) and videos of 2-6 frames (per frame a 2-token
    "FrameN:" label, then ``START, IMAGE * 4, END``), as InternVL's processor lays them out."""
    generator = torch.Generator().manual_seed(seed)
    layouts = [([3], 0), ([], 4), ([1, 2], 0), ([5], 2), ([], 6), ([2], 3), ([1], 0), ([4, 1], 0)]
    items = []
    for index, (images, frames) in enumerate(layouts):
        tokens = [torch.randint(0, 56, (4 + 3 * (index % 4),), generator=generator)]
        for tiles in images:
            tokens += [torch.tensor([START] + [IMAGE] * (4 * tiles) + [END]),
                       torch.randint(0, 56, (3,), generator=generator)]
        for _ in range(frames):
            tokens += [torch.randint(0, 56, (2,), generator=generator), torch.tensor([START] + [IMAGE] * 4 + [END])]
        input_ids = torch.cat([*tokens, torch.randint(0, 56, (4,), generator=generator)])
        item = {"input_ids": input_ids[None], "labels": input_ids.masked_fill(input_ids == IMAGE, -100)}
        if images or frames:
            item["pixel_values"] = torch.randn(sum(images) + frames, 3, TILE, TILE, generator=generator)
        items.append(item)
    return items


def llava_onevision() -> PreTrainedModel:
    """A tiny LLaVA-OneVision (SigLIP tower, Qwen2 language model), float64: 8x8 crops of 2x2 patches (16 tokens a
    crop, 4 a video frame after pooling), anyres grids up to 16x16."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vision = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": TILE, "patch_size": 2}
    config = LlavaOnevisionConfig(text_config={"model_type": "qwen2"} | TEXT, vision_config=vision,
                                  image_token_id=IMAGE, video_token_id=VIDEO, vision_feature_layer=-1,
                                  image_grid_pinpoints=[[8, 8], [8, 16], [16, 8], [16, 16]])
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(config).double()


def llava_onevision_items(seed: int = 0) -> list[dict]:
    """Samples with one image (anyres crops), several images (base crop each) or a video of 2-5 frames."""
    from lightning_dhp.hf.families import LlavaOnevision

    family = LlavaOnevision(llava_onevision())
    generator = torch.Generator().manual_seed(seed)
    layouts = [([(10, 20)], 0), ([], 3), ([(8, 8), (12, 6)], 0), ([(16, 16)], 0), ([], 5), ([(20, 9)], 2),
               ([(6, 6)], 0), ([], 2)]
    items = []
    for index, (sizes, frames) in enumerate(layouts):
        tokens, item = [torch.randint(0, 56, (4 + 3 * (index % 4),), generator=generator)], {}
        if sizes:
            crops = [family.crops(torch.tensor(size), len(sizes)) for size in sizes]
            item |= {"pixel_values": torch.randn(len(sizes), max(crops), 3, TILE, TILE, generator=generator),
                     "image_sizes": torch.tensor(sizes), "batch_num_images": torch.tensor([len(sizes)])}
            for size in sizes:
                tokens += [torch.tensor([IMAGE] * family.image_tokens(torch.tensor(size), len(sizes))),
                           torch.randint(0, 56, (2,), generator=generator)]
        if frames:
            item["pixel_values_videos"] = torch.randn(1, frames, 3, TILE, TILE, generator=generator)
            tokens += [torch.tensor([VIDEO] * (4 * frames + 1)), torch.randint(0, 56, (3,), generator=generator)]
        input_ids = torch.cat(tokens)
        items.append(item | {"input_ids": input_ids[None],
                             "labels": input_ids.masked_fill((input_ids == IMAGE) | (input_ids == VIDEO), -100)})
    return items
