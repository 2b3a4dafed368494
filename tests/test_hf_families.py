"""Single-process checks of the multimodal families (``lightning_dhp/hf/families``): packed samples through
``HFModule`` equal each sample through the model's own forward, the item transforms refuse what the processor
would not have produced (naming the dataset index), and unsupported models are refused by name. The
multi-process exactness of training lives in ``tests/test_hf.py``."""

from __future__ import annotations

import pytest
import torch
import transformers

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.distributed import CPContext, cp_context
from lightning_dhp.errors import DHPConfigError, DHPDataError
from lightning_dhp.hf import HFModule
from lightning_dhp.lightning import DHPPacking
from lightning_dhp.lightning.batch import DHPBatchInfo
from tests import hf_models

FAMILIES = {"qwen3_vl": (hf_models.qwen3_vl, hf_models.qwen3_vl_items),
            "internvl": (hf_models.internvl, hf_models.internvl_items),
            "llava_onevision": (hf_models.llava_onevision, hf_models.llava_onevision_items)}


def _packed_logits(task: HFModule, items: list[dict]) -> torch.Tensor:
    """Every item through the task's packing options into one degree-1 group, then the task's forward."""
    packing = DHPPacking(**task.packing_options)
    loaded = [packing.load(items, index, item["input_ids"].numel()) for index, item in enumerate(items)]
    layout = ZigzagLayout([len(item["input_ids"]) for item in loaded], 1, 0)
    batch = packing.collate_group(loaded, layout)
    batch["dhp"] = DHPBatchInfo(layout, (0,), tuple(range(len(items))), 0, 1, 1, 1, len(items))
    with torch.no_grad(), cp_context(CPContext(layout, None, (0,))):
        return task(batch)


def qwen3_vl_moe() -> transformers.PreTrainedModel:
    config = hf_models.qwen3_vl().config.to_dict()
    config["text_config"] |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                              "decoder_sparse_step": 1}
    torch.manual_seed(0)
    model_class = transformers.Qwen3VLMoeForConditionalGeneration
    model = model_class(model_class.config_class(**config)).double()
    model.set_experts_implementation("eager")  # the grouped-GEMM kernel takes no float64
    return model


@pytest.mark.parametrize("name", [*FAMILIES, "qwen3_vl_moe"])
def test_packed_samples_with_images_and_videos_equal_each_sample_through_the_models_own_forward(name):
    make, make_items = FAMILIES.get(name, (qwen3_vl_moe, hf_models.qwen3_vl_items))
    model, items = make(), make_items()
    with torch.no_grad():
        expected = torch.cat([hf_models.reference_logits(model, item) for item in items])
    torch.testing.assert_close(_packed_logits(HFModule(model), items), expected, rtol=1e-9, atol=1e-12)


def test_qwen3_vl_positions_are_the_models_own_with_one_grid_per_temporal_patch():
    model = hf_models.qwen3_vl()
    transform = HFModule(model).packing_options["item_transform"]
    for item in hf_models.qwen3_vl_items()[:4]:
        input_ids = item["input_ids"].reshape(1, -1)
        types = (input_ids == hf_models.IMAGE).long() + 2 * (input_ids == hf_models.VIDEO).long()
        expected, _ = model.model.get_rope_index(input_ids, types, item.get("image_grid_thw"),
                                                 item.get("video_grid_thw"))
        assert torch.equal(transform(item)["position_ids"], expected[:, 0].T)


def test_an_items_vision_patches_come_from_its_shapes():
    qwen3, internvl, llava = (HFModule(make()) for make, _ in FAMILIES.values())
    assert qwen3.vision_patches(hf_models.qwen3_vl_items()[1]) == 6 * 2 * 4
    assert internvl.vision_patches(hf_models.internvl_items()[3]) == (5 + 2) * 16  # 5 tiles and 2 frames of 4x4
    items = hf_models.llava_onevision_items()
    assert llava.vision_patches(items[2]) == 2 * 16  # two images of a multi-image sample: one crop each
    assert llava.vision_patches(items[1]) == 3 * 16  # three frames


def _bad(items: list[dict], index: int, **changes) -> list[dict]:
    items[index] = {**items[index], **changes}
    return items


def _drop(item: dict, token: int) -> torch.Tensor:
    """The item's input_ids without its first ``token``."""
    ids = item["input_ids"].reshape(-1)
    first = int(torch.nonzero(ids == token)[0])
    return torch.cat([ids[:first], ids[first + 1:]])[None]


def _merged_timestamps(item: dict) -> torch.Tensor:
    """A Qwen3-VL video whose temporal patches' tokens run together (no timestamps, start or end between them)."""
    ids = item["input_ids"].reshape(-1)
    video = ids == hf_models.VIDEO
    first, last = int(torch.nonzero(video)[0]), int(torch.nonzero(video)[-1])
    return torch.cat([ids[:first], ids[first:last + 1][video[first:last + 1]], ids[last + 1:]])[None]


BAD_ITEMS = {
    "qwen3 video tokens without timestamps": (
        "qwen3_vl", 1, lambda item: {"input_ids": _merged_timestamps(item)},
        r"video tokens do not match video_grid_thw: .* lengths \[12\], but video_grid_thw=\[\[6, 2, 4\]\] needs "
        r"\[2, 2, 2, 2, 2, 2\] .*one run per temporal patch"),
    "qwen3 images without pixels": (
        "qwen3_vl", 0, lambda item: {"pixel_values": None},
        "the sample has image tokens .* but no pixel_values"),
    "internvl tokens for one tile less": (
        "internvl", 0, lambda item: {"pixel_values": item["pixel_values"][:2]},
        r"image tokens do not match pixel_values: .* lengths \[12\], but its 2 tiles/frames need 4 tokens each"),
    "llava video without its newline token": (
        "llava_onevision", 1, lambda item: {"input_ids": _drop(item, hf_models.VIDEO),
                                            "labels": _drop(item, hf_models.VIDEO)[0]},
        r"video tokens do not match the pixels: the sample has 12 video tokens .* 1 video\(s\) of \[3\] frames"),
}


@pytest.mark.parametrize("case", list(BAD_ITEMS))
def test_placeholders_that_do_not_match_the_pixels_are_a_data_error_naming_the_index(case):
    name, index, change, message = BAD_ITEMS[case]
    make, make_items = FAMILIES[name]
    items = make_items()
    items = _bad(items, index, **change(items[index]))
    packing = DHPPacking(**HFModule(make()).packing_options)
    with pytest.raises(DHPDataError, match=f"dataset item {index} failed: .*{message}"):
        packing.load(items, index, items[index]["input_ids"].numel())


def test_other_multimodal_models_and_linear_attention_hybrids_are_refused_by_name():
    text = {key: value for key, value in hf_models.TEXT.items() if not key.endswith("token_id")}
    vision = {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 2}
    llava = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config={"model_type": "llama"} | text, vision_config=vision))
    with pytest.raises(DHPConfigError, match=r"LlavaForConditionalGeneration is not a model HFModule can train; "
                                             r"supported: .*Qwen3VLForConditionalGeneration.*InternVL"):
        HFModule(llava)
    hybrid = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(
        **text, head_dim=4, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=4,
        linear_value_head_dim=4, layer_types=["linear_attention", "full_attention"]))
    with pytest.raises(DHPConfigError, match=r"Qwen3_5ForCausalLM .*linear-attention \(GatedDeltaNet\) layers \[0\], "
                                             "which need a context-parallel algorithm of their own"):
        HFModule(hybrid)


def test_a_transformers_older_than_the_floor_is_refused_on_import_saying_which():
    import subprocess
    import sys

    code = "import transformers; transformers.__version__ = '5.17.0'; import lightning_dhp.hf"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "lightning_dhp.hf needs transformers >= 5.18, found 5.17.0" in result.stderr
