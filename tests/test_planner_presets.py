"""CostModel.for_transformer: pinned device and model presets, the FLOP formulas against hand-worked
numbers, HF configs, and bad input."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_dhp.planner import CostModel
from lightning_dhp.planner.presets import (
    DEVICE_PRESETS,
    MODEL_PRESETS,
    VISION_PRESETS,
    DevicePreset,
    TransformerShape,
    VisionShape,
)


def test_device_presets_are_pinned():
    pinned = {
        "H100": (989e12, 0.40, 450e9, 50e9, 15e-6),
        "H200": (989e12, 0.42, 450e9, 50e9, 15e-6),
        "A100": (312e12, 0.50, 300e9, 25e9, 20e-6),
        "Ascend 910B": (313e12, 0.35, 56e9, 25e9, 25e-6),
    }
    assert {name: dataclasses.astuple(preset)[1:] for name, preset in DEVICE_PRESETS.items()} == pinned


def test_model_presets_are_pinned():
    assert {name: dataclasses.astuple(shape)[:6] for name, shape in MODEL_PRESETS.items()} == {
        "internvl3-2b": (28, 1536, 12, 2, 8960, 151674),
        "internvl3-8b": (28, 3584, 28, 4, 18944, 151674),
        "qwen2.5-vl-7b": (28, 3584, 28, 4, 18944, 152064),
    }


def test_a_llama_7b_shape_on_h100_matches_hand_worked_numbers_and_the_default_compute():
    model = CostModel.for_transformer(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=32000)
    flops_per_s = 989e12 * 0.40
    # weights per token: 32 x (Q,O 2 x 4096^2 + K,V 2 x 4096 x 1024 + MLP 3 x 4096 x 14336) + head 4096 x 32000
    weights = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 32000
    assert weights == 7_110_393_856
    assert model.linear_s_per_token == pytest.approx(6 * weights / flops_per_s, rel=1e-12)
    assert model.attention_s_per_token2 == pytest.approx(6 * 4096 * 32 / flops_per_s, rel=1e-12)
    assert model.kv_bytes_per_token == 3 * 2 * 1024 * 2 * 32 == 393216
    assert model.overhead_s == pytest.approx(32 * 1.5e-4)
    assert model.ring_step_latency_s == pytest.approx(2 * 32 * 15e-6)
    assert (model.intra_node_bytes_per_s, model.inter_node_bytes_per_s) == (pytest.approx(360e9), pytest.approx(40e9))
    default = CostModel.default()
    for name in ("attention_s_per_token2", "linear_s_per_token", "overhead_s", "ring_step_latency_s"):
        assert getattr(model, name) == pytest.approx(getattr(default, name), rel=0.1), name


def test_qwen25_vl_7b_on_910b_from_a_config_dict():
    config = {"model_type": "qwen2_5_vl", "text_config": {
        "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
        "intermediate_size": 18944, "vocab_size": 152064}}
    model = CostModel.for_transformer(config, device="Ascend 910B")
    flops_per_s = 313e12 * 0.35
    weights = 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944) + 3584 * 152064
    assert model.linear_s_per_token == pytest.approx(6 * weights / flops_per_s, rel=1e-12)
    assert model.attention_s_per_token2 == pytest.approx(6 * 3584 * 28 / flops_per_s, rel=1e-12)
    assert model.kv_bytes_per_token == 3 * 2 * 512 * 2 * 28
    assert model.intra_node_bytes_per_s == pytest.approx(56e9 * 0.8)
    assert model == CostModel.for_transformer(**_dims(MODEL_PRESETS["qwen2.5-vl-7b"]), device="910b")


def _dims(shape: TransformerShape) -> dict[str, int]:
    return {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads, "kv_heads": shape.kv_heads,
            "intermediate": shape.intermediate, "vocab": shape.vocab}


def test_a_transformers_config_object_gives_the_same_model_as_its_dimensions():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=688, vocab_size=1000, head_dim=64)
    expected = CostModel.for_transformer(layers=4, hidden=256, heads=8, kv_heads=2, intermediate=688, vocab=1000,
                                         head_dim=64, device="A100")
    assert CostModel.for_transformer(config, device="A100") == expected
    assert expected.kv_bytes_per_token == 3 * 2 * (2 * 64) * 2 * 4


def test_a_custom_device_preset_and_a_dense_mlp():
    device = DevicePreset("toy", peak_bf16_flops=1e12, utilisation=0.5, intra_node_bytes_per_s=1e9,
                          inter_node_bytes_per_s=1e8, ring_step_latency_s=1e-5)
    model = CostModel.for_transformer(layers=1, hidden=8, heads=2, intermediate=16, vocab=10, gated_mlp=False,
                                      device=device)
    assert model.linear_s_per_token == pytest.approx(6 * (2 * 64 + 2 * 64 + 2 * 128 + 80) / 0.5e12)


QWEN25_TEXT = {"num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
               "intermediate_size": 18944, "vocab_size": 152064}
# Qwen2.5-VL-7B-Instruct's config.json vision_config (the keys that matter here)
QWEN25_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "in_channels": 3, "in_chans": 3,
                 "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14,
                 "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112}
H100_FLOPS = 989e12 * 0.40


def test_vision_presets_are_pinned():
    assert {name: dataclasses.astuple(shape) for name, shape in VISION_PRESETS.items()} == {
        "internvl3-2b": (24, 1024, 4096, 1536, 14, 1, 3, 2, False, 1536),
        "internvl3-8b": (24, 1024, 4096, 3584, 14, 1, 3, 2, False, 3584),
        "qwen2.5-vl-7b": (32, 1280, 3420, 3584, 14, 2, 3, 2, True, None),
    }


def test_the_qwen25_vl_7b_vision_tower_from_its_config_matches_hand_worked_flops():
    model = CostModel.for_transformer({"text_config": QWEN25_TEXT, "vision_config": QWEN25_VISION})
    # patch embedding 3 x 2 x 14 x 14 x 1280; 32 blocks of QKV + out (4 x 1280^2) and a SwiGLU MLP (3 x 1280 x 3420);
    # the PatchMerger (5120 x 5120 + 5120 x 3584) once per 2 x 2 patches
    weights = 3 * 2 * 14 * 14 * 1280 + 32 * (4 * 1280**2 + 3 * 1280 * 3420) + (5120 * 5120 + 5120 * 3584) / 4
    assert weights == 642_611_200
    assert 1.26e9 <= 2 * weights <= 1.3e9  # ~1.26 GFLOP forward per patch: 2 x ~630M weights in the blocks
    assert 4 * 2 * weights == pytest.approx(5e9, rel=0.05)  # ~5 GFLOP forward per visual token
    assert model.vision_s_per_patch == pytest.approx(6 * weights / H100_FLOPS, rel=1e-12)
    text_only = CostModel.for_transformer({"text_config": QWEN25_TEXT})
    assert model == dataclasses.replace(text_only, vision_s_per_patch=model.vision_s_per_patch)
    assert text_only.vision_s_per_patch == 0.0
    assert model == CostModel.for_transformer(MODEL_PRESETS["qwen2.5-vl-7b"], vision=VISION_PRESETS["qwen2.5-vl-7b"])


def test_a_qwen2_vl_tower_reads_embed_dim_mlp_ratio_and_a_plain_mlp():
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16, "in_channels": 3,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}
    shape = VisionShape.from_config({"vision_config": vision, "text_config": QWEN25_TEXT})
    assert (shape.hidden, shape.intermediate, shape.out_hidden, shape.gated_mlp) == (1280, 5120, 3584, False)
    assert shape.weights_per_patch == 3 * 2 * 14**2 * 1280 + 32 * (4 * 1280**2 + 2 * 1280 * 5120) + 11_141_120


def test_an_internvl3_8b_config_gives_the_internvit_preset():
    config = {"downsample_ratio": 0.5, "llm_config": {**QWEN25_TEXT, "vocab_size": 151674},
              "vision_config": {"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096,
                                "num_attention_heads": 16, "patch_size": 14, "image_size": 448, "num_channels": 3,
                                "hidden_act": "gelu"}}
    assert VisionShape.from_config(config) == VISION_PRESETS["internvl3-8b"]
    # patch embedding 3 x 14 x 14 x 1024; 24 blocks of 4 x 1024^2 + 2 x 1024 x 4096; mlp1 (4096 x 3584 + 3584^2) / 4
    assert VISION_PRESETS["internvl3-8b"].weights_per_patch == 602_112 + 301_989_888 + 6_881_280


def test_a_transformers_internvl_hf_config_object_with_list_patch_sizes_gives_the_internvit_preset():
    transformers = pytest.importorskip("transformers")
    config = transformers.InternVLConfig(
        text_config={"model_type": "qwen2", **QWEN25_TEXT, "vocab_size": 151674}, downsample_ratio=0.5,
        vision_config={"num_hidden_layers": 24, "hidden_size": 1024, "intermediate_size": 4096,
                       "num_attention_heads": 16, "patch_size": [14, 14], "image_size": [448, 448],
                       "num_channels": 3, "hidden_act": "gelu"})
    assert VisionShape.from_config(config) == VISION_PRESETS["internvl3-8b"]


def test_a_transformers_qwen25_vl_config_object_gives_the_same_vision_tower():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2_5_VLConfig(text_config=QWEN25_TEXT, vision_config=QWEN25_VISION)
    assert VisionShape.from_config(config) == VISION_PRESETS["qwen2.5-vl-7b"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 2, "hidden": 8}, r"missing \['heads', 'intermediate', 'vocab'\]"),
        ({"config": {"hidden_size": 8}}, "the model config lacks"),
        ({"config": {"hidden_size": 8}, "layers": 2}, "pass a config or dimensions, not both"),
        ({"layers": 2, "hidden": 8, "heads": 3, "kv_heads": 2, "intermediate": 4, "vocab": 5},
         "heads=3 must be a multiple of kv_heads=2"),
        ({"layers": 0, "hidden": 8, "heads": 2, "intermediate": 4, "vocab": 5}, r"layers=0 must be an integer >= 1"),
        ({"layers": 2, "hidden": 8, "heads": 2, "intermediate": 4, "vocab": 5, "device": "TPU"},
         "unknown device 'TPU'"),
        ({"config": {"text_config": QWEN25_TEXT, "vision_config": {"depth": 2, "hidden_size": 8}}},
         r"the vision_config lacks \['intermediate_size', 'out_hidden_size', 'patch_size'\]; pass vision="),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CostModel.for_transformer(**kwargs)


def test_a_vision_shape_beside_dimensions_sets_the_seconds_per_patch_and_checks_itself():
    tower = VisionShape(depth=1, hidden=8, intermediate=8, out_hidden=8)  # no merge: the projector is 8x8 + 8x8
    model = CostModel.for_transformer(layers=2, hidden=8, heads=2, intermediate=4, vocab=5, vision=tower)
    assert tower.weights_per_patch == 3 * 14 * 14 * 8 + (4 * 64 + 2 * 64) + 64 + 64
    assert model.vision_s_per_patch == pytest.approx(6 * tower.weights_per_patch / H100_FLOPS, rel=1e-12)
    with pytest.raises(ValueError, match=r"VisionShape.merge_size=0 must be an integer >= 1"):
        VisionShape(depth=1, hidden=8, intermediate=8, out_hidden=8, merge_size=0)
