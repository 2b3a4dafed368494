"""Hugging Face models under DHP against a plain single-process HF loop, in float64.

One spawned world per size (1, 2 and 3 processes) trains a tiny Llama (GQA), Qwen2-VL, Qwen2.5-VL,
Qwen3-VL (DeepStack), InternVL and LLaVA-OneVision for 3 optimizer steps (on 2+ processes also
FSDP-sharded, the Llama built on the meta device with rank 0's weights, and Qwen2-VL under all-gather CP
and the group-free ring); the tests compare the parameters with ``tests.hf_models``' oracle (each sample
alone through the model's own forward and attention, the same AdamW).
"""

from __future__ import annotations

import dataclasses
import pickle
import tempfile
from functools import cache

import pytest
import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

from lightning_dhp import DHPStrategy, ZigzagLayout
from lightning_dhp.distributed import CPContext, cp_context
from lightning_dhp.errors import DHPConfigError, DHPDataError
from lightning_dhp.hf import ATTENTION_NAME, HFModule, dhp_attention
from lightning_dhp.hf.families import QwenVL
from lightning_dhp.lightning import DHPBatchSampler, DHPDataModule, DHPPacking, DHPPlanReport, checkpoints
from lightning_dhp.lightning.batch import DHPBatchInfo
from lightning_dhp.lightning.sharding import fsdp_unsupported_reason
from lightning_dhp.testing import run_distributed
from tests import hf_models
from tests.helpers import (
    GLOBAL_BATCH,
    LENGTHS,
    STEPS,
    as_torchrun_rank,
    assert_parameters_match,
    assert_within_bf16_rounding,
    cpu_trainer,
    error_of,
    load_weights_from_rank_zero,
    same_error_on_every_rank,
    tokens_for_full_degree,
)
from tests.tiny_lm import TokenDataset

WORLD_SIZES = (1, 2, 3)
TOKENS_PER_DEVICE = {1: 64, 2: 20, 3: 20}  # the longest samples need CP degree 2 on 2+ processes
VL_TOKENS_PER_DEVICE = {1: 64, 2: 16, 3: 16}
VL_BATCH = 5
MM_BATCH = 3  # 8 items: 3 global batches an epoch, so 3 steps see every item once
FSDP_UNSUPPORTED = fsdp_unsupported_reason()  # the torch floor (2.11) cannot shard under DHP
# today's MLLMs: the model, its items, the decoder layer FSDP shards on its own
MULTIMODAL = {"qwen3_vl": (hf_models.qwen3_vl, hf_models.qwen3_vl_items, Qwen3VLTextDecoderLayer),
              "internvl": (hf_models.internvl, hf_models.internvl_items, Qwen2DecoderLayer),
              "llava_onevision": (hf_models.llava_onevision, hf_models.llava_onevision_items, Qwen2DecoderLayer)}
# parameters a model computes with but whose output feeds nothing (SigLIP's pooling head and last norm: LLaVA
# takes the hidden states before them); they must keep no gradient under DHP too
UNUSED = {"llava_onevision": ("model.vision_tower.post_layernorm.", "model.vision_tower.head.")}
BAD_INDEX = 3
HELD_OUT = TokenDataset(LENGTHS[:GLOBAL_BATCH], seed=1)  # one global batch


class RecordingModule(HFModule):
    """Records, per step and rank, which vision rows of which dataset sample this rank held."""

    def __init__(self, model) -> None:
        super().__init__(model, optimizer=hf_models.optimizer)
        self.held: list[tuple[int, int, tuple[int, ...]]] = []
        self.video_grids: list[list[int]] = []  # the (t, h, w) of every video piece this rank encoded
        if isinstance(self.family, QwenVL):
            encode = model.model.get_video_features

            def recording(pixel_values_videos, video_grid_thw, **kwargs):
                self.video_grids += video_grid_thw.tolist()
                return encode(pixel_values_videos, video_grid_thw, **kwargs)

            model.model.get_video_features = recording

    def training_step(self, batch, batch_idx):
        info = batch["dhp"]
        if self.family is not None and len(batch["input_ids"]):
            valid = info.layout.valid
            for position, index in enumerate(info.sample_indices):
                rows = batch["vision_rows"][valid & (info.layout.sequence_ids == position)]
                self.held.append((batch_idx, index, tuple(sorted(rows[rows > 0].tolist()))))
        return super().training_step(batch, batch_idx)


class PretrainedOnRankZero(HFModule):
    """Built on the meta device; once the strategy has sharded and materialised it, rank 0 loads the Llama's
    weights (as from a pretrained checkpoint) and they reach every rank's shards. Rotary frequencies are
    buffers no checkpoint holds: materialisation has to recompute them."""

    def on_fit_start(self) -> None:
        load_weights_from_rank_zero(self, lambda: hf_models.llama().state_dict())


def _vl_lengths(items: list[dict]) -> list[int]:
    return [item["input_ids"].numel() for item in items]


def _bad_items() -> list[dict]:
    items = hf_models.vl_items()
    items[BAD_INDEX]["image_grid_thw"] = torch.tensor([[1, 4, 4]])  # 4 tokens' grid for the item's run of 6
    return items


def _fit(world_size: int, task: HFModule, data: DHPDataModule, tokens: int, precision: str = "32-true",
         **strategy_kwargs) -> dict:
    with tempfile.TemporaryDirectory() as report_dir:  # the report's plot and summary files, not the cwd
        plans = DHPPlanReport(dirpath=report_dir, num_plotted_steps=1, log_metrics=False)
        cpu_trainer(world_size, DHPStrategy(tokens, **strategy_kwargs), STEPS, callbacks=[plans],
                 precision=precision).fit(task, datamodule=data)
    groups = [g for entry in plans.history for r in entry["plan"].rounds for g in r.groups]
    fsdp = strategy_kwargs.get("sharding") == "fsdp"
    state = checkpoints.sharded_model_state(task) if fsdp else task.state_dict()  # FSDP: gathered on rank 0 only
    return {"params": {name.removeprefix("model."): value.detach().clone() for name, value in state.items()},
            "rounds": max(len(entry["plan"].rounds) for entry in plans.history),
            "degree": max(group.degree for group in groups), "held": getattr(task, "held", []),
            "video_grids": getattr(task, "video_grids", []),
            "idle": sum(entry["plan"].stats()["idle_device_rounds"] for entry in plans.history)}


def _scenarios(rank: int, world_size: int) -> dict:
    as_torchrun_rank(rank)
    reports = {}
    tokens = TOKENS_PER_DEVICE[world_size]
    llama = hf_models.module(hf_models.llama())
    data = DHPDataModule(TokenDataset(LENGTHS), LENGTHS, GLOBAL_BATCH, seed=0, val_dataset=HELD_OUT,
                         val_lengths=HELD_OUT.lengths, predict_dataset=HELD_OUT, predict_lengths=HELD_OUT.lengths)
    reports["llama"] = _fit(world_size, llama, data, tokens)
    reports["llama"]["val_loss"] = cpu_trainer(world_size, DHPStrategy(tokens)).validate(
        llama, datamodule=data, verbose=False)[0]["val_loss"]
    reports["llama"]["predict"] = cpu_trainer(world_size, DHPStrategy(tokens)).predict(llama, datamodule=data)
    # bf16-mixed: float32 weights; HF's float32 RoPE makes q and k float32 while v stays bf16
    reports["llama_bf16_mixed"] = _fit(world_size, HFModule(hf_models.llama().float(), optimizer=hf_models.sgd),
                                       data, tokens, precision="bf16-mixed")
    items = hf_models.vl_items()
    for version in ("2", "2.5"):
        task = RecordingModule(hf_models.qwen_vl(version))
        data = DHPDataModule(items, _vl_lengths(items), VL_BATCH, seed=0, predict_dataset=items,
                             predict_lengths=_vl_lengths(items), **task.packing_options)
        reports[f"qwen{version}_vl"] = _fit(world_size, task, data, VL_TOKENS_PER_DEVICE[world_size])
        if version == "2":
            predicting = cpu_trainer(world_size, DHPStrategy(VL_TOKENS_PER_DEVICE[world_size]))
            reports["qwen2_vl"]["predict"] = predicting.predict(task, datamodule=data)
    for name, (make, make_items, layer) in MULTIMODAL.items():
        own_items = make_items()
        task = RecordingModule(make())
        data = DHPDataModule(own_items, _vl_lengths(own_items), MM_BATCH, seed=0, predict_dataset=own_items,
                             predict_lengths=_vl_lengths(own_items), **task.packing_options)
        tokens = tokens_for_full_degree(_vl_lengths(own_items), world_size)
        reports[name] = _fit(world_size, task, data, tokens)
        if name == "qwen3_vl":
            predicting = cpu_trainer(world_size, DHPStrategy(tokens))
            reports[name]["predict"] = predicting.predict(task, datamodule=data)
        if world_size > 1 and FSDP_UNSUPPORTED is None:
            task = RecordingModule(make())
            data = DHPDataModule(own_items, _vl_lengths(own_items), MM_BATCH, seed=0, **task.packing_options)
            reports[f"{name}_fsdp"] = _fit(world_size, task, data, tokens, sharding="fsdp", fsdp_modules={layer})
    if world_size > 1:  # the other CP modes
        for name, options in (("allgather", {"cp_implementation": "allgather"}),
                              ("group_free", {"group_free_ring": True})):
            task = RecordingModule(hf_models.qwen_vl())
            data = DHPDataModule(items, _vl_lengths(items), VL_BATCH, seed=0, **task.packing_options)
            reports[f"qwen2_vl_{name}"] = _fit(world_size, task, data, VL_TOKENS_PER_DEVICE[world_size], **options)
    if world_size > 1 and FSDP_UNSUPPORTED is None:  # FSDP2 over all ranks, decoder layers sharded on their own
        with torch.device("meta"):  # as for a model too large for one rank: weights come from rank 0
            llama = PretrainedOnRankZero(hf_models.llama(), optimizer=hf_models.optimizer)
        reports["llama_fsdp"] = _fit(world_size, llama, DHPDataModule(TokenDataset(LENGTHS), LENGTHS, GLOBAL_BATCH,
                                                                        seed=0),
                                     TOKENS_PER_DEVICE[world_size], sharding="fsdp", fsdp_modules={LlamaDecoderLayer})
        task = RecordingModule(hf_models.qwen_vl())
        data = DHPDataModule(items, _vl_lengths(items), VL_BATCH, seed=0, **task.packing_options)
        reports["qwen2_vl_fsdp"] = _fit(world_size, task, data, VL_TOKENS_PER_DEVICE[world_size], sharding="fsdp",
                                        fsdp_modules={Qwen2VLDecoderLayer})
    task = RecordingModule(hf_models.qwen_vl())
    bad = _bad_items()
    data = DHPDataModule(bad, _vl_lengths(bad), len(bad), seed=0, **task.packing_options)
    reports["bad_item"] = error_of(lambda: _fit(world_size, task, data, VL_TOKENS_PER_DEVICE[world_size]))
    return reports


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"{size}-process" for size in WORLD_SIZES])
def world(request) -> tuple[int, list[dict]]:
    return request.param, run_distributed(_scenarios, request.param, timeout_s=280)


def _batches(lengths: list[int], global_batch: int) -> list[list[int]]:
    sampler = DHPBatchSampler(lengths, global_batch, seed=0)
    return sampler.batches()


@cache
def _plain_hf_loop(name: str) -> dict:
    """The plain HF loop's parameters after STEPS steps of ``name`` ("llama", "qwen2_vl", "qwen2.5_vl" or a
    MULTIMODAL name) on its test data, computed once a session (the tests only read them)."""
    if name == "llama":
        samples = [{"input_ids": tokens} for tokens in TokenDataset(LENGTHS).samples]
        return hf_models.reference_training(hf_models.llama(), samples, _batches(LENGTHS, GLOBAL_BATCH), STEPS)
    if name in ("qwen2_vl", "qwen2.5_vl"):
        items = hf_models.vl_items()
        return hf_models.reference_training(hf_models.qwen_vl(name.removeprefix("qwen").removesuffix("_vl")), items,
                                            _batches(_vl_lengths(items), VL_BATCH), STEPS)
    make, make_items, _ = MULTIMODAL[name]
    items = make_items()
    return hf_models.reference_training(make(), items, _batches(_vl_lengths(items), MM_BATCH), STEPS)


def _moved(expected: dict, initial: dict, unused: tuple[str, ...] = ()) -> None:
    """Every parameter trains but those under the ``unused`` prefixes (computed, but feeding no output)."""
    moved = {name for name in expected if not torch.equal(expected[name], initial[name])}
    assert moved == {name for name in expected if not name.startswith(unused)}, "every used parameter should train"


def test_llama_under_dhp_equals_the_plain_hf_loop(world):
    world_size, reports = world
    expected = _plain_hf_loop("llama")
    _moved(expected, hf_models.llama().state_dict())
    for report in reports:
        assert_parameters_match(report["llama"]["params"], expected)
    assert reports[0]["llama"]["rounds"] > 1, "the test data should need several rounds"
    if world_size > 1:
        assert reports[0]["llama"]["degree"] > 1, "the test data should use context parallelism"


def test_llama_under_bf16_mixed_matches_the_plain_hf_loop_under_bf16_autocast(world):
    world_size, reports = world
    samples = [{"input_ids": tokens} for tokens in TokenDataset(LENGTHS).samples]
    batches = _batches(LENGTHS, GLOBAL_BATCH)
    expected = hf_models.reference_training(hf_models.llama().float(), samples, batches, STEPS, bf16_autocast=True,
                                            make_optimizer=hf_models.sgd)
    initial = hf_models.llama().float().state_dict()
    for report in reports:
        assert_within_bf16_rounding(report["llama_bf16_mixed"]["params"], expected, initial)
    if world_size > 1:
        assert reports[0]["llama_bf16_mixed"]["degree"] > 1


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_qwen_vl_under_dhp_equals_the_plain_hf_loop(world, version):
    world_size, reports = world
    items = hf_models.vl_items()
    expected = _plain_hf_loop(f"qwen{version}_vl")
    _moved(expected, hf_models.qwen_vl(version).state_dict())
    for report in reports:
        assert_parameters_match(report[f"qwen{version}_vl"]["params"], expected)
    report = reports[0][f"qwen{version}_vl"]
    assert report["rounds"] > 1, "the test data should need several rounds"
    if world_size > 1:
        assert report["degree"] > 1, "the test data should use context parallelism"
        assert _straddling_images(reports, version, items) > 0, "some image should straddle a shard boundary"
        assert report["idle"] > 0, "some rank should be idle in some round (it runs the model on a dummy token)"
    grids = [grid for rank_report in reports for grid in rank_report[f"qwen{version}_vl"]["video_grids"]]
    assert grids and all(t == 1 for t, _, _ in grids), "videos are encoded one temporal patch at a time"
    if world_size > 1:
        assert sum(bool(rank_report[f"qwen{version}_vl"]["video_grids"]) for rank_report in reports) > 1, \
            "more than one rank should encode video"


def _straddling_images(reports: list[dict], version: str, items: list[dict]) -> int:
    """Images whose tokens were held by two or more ranks in one step."""
    holders: dict[tuple[int, int, int], set[int]] = {}
    for rank, report in enumerate(reports):
        for step, index, rows in report[f"qwen{version}_vl"]["held"]:
            grid = items[index].get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
            ends = (grid.prod(-1) // 4).cumsum(0)
            for row in rows:
                image = int(torch.searchsorted(ends, torch.tensor(row), right=False))
                holders.setdefault((step, index, image), set()).add(rank)
    return sum(len(ranks) > 1 for ranks in holders.values())


@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
@pytest.mark.parametrize("name", list(MULTIMODAL))
def test_todays_mllms_under_dhp_equal_the_plain_hf_loop(world, name, sharding):
    world_size, reports = world
    if sharding == "fsdp" and world_size == 1:
        pytest.skip("sharding needs 2 or more processes")
    if sharding == "fsdp" and FSDP_UNSUPPORTED is not None:
        pytest.skip(FSDP_UNSUPPORTED)
    expected = _plain_hf_loop(name)
    _moved(expected, MULTIMODAL[name][0]().state_dict(), UNUSED.get(name, ()))
    scenario = name if sharding == "replicated" else f"{name}_fsdp"
    for report in reports[:1] if sharding == "fsdp" else reports:  # FSDP gathers the full state to rank 0
        assert_parameters_match(report[scenario]["params"], expected)
    report = reports[0][scenario]
    assert report["rounds"] > 1, "the test data should need several rounds"
    if world_size > 1:
        assert report["degree"] == world_size, f"the longest samples should run at degree {world_size}"
    if sharding == "replicated" and world_size > 1:
        assert _split_visuals(reports, name) > 0, "some sample's visual tokens should straddle a shard boundary"


def _split_visuals(reports: list[dict], name: str) -> int:
    """(step, sample) pairs whose visual tokens were held by two or more ranks."""
    holders: dict[tuple[int, int], set[int]] = {}
    for rank, report in enumerate(reports):
        for step, index, rows in report[name]["held"]:
            if rows:
                holders.setdefault((step, index), set()).add(rank)
    return sum(len(ranks) > 1 for ranks in holders.values())


def _trained(model, expected: dict):
    model.load_state_dict(expected)
    return model.eval()


def test_validation_and_predict_of_the_trained_models_equal_their_own_forward(world):
    _, reports = world
    llama = _trained(hf_models.llama(), _plain_hf_loop("llama"))
    items = hf_models.vl_items()
    qwen = _trained(hf_models.qwen_vl(), _plain_hf_loop("qwen2_vl"))
    qwen3_items = hf_models.qwen3_vl_items()
    qwen3 = _trained(hf_models.qwen3_vl(), _plain_hf_loop("qwen3_vl"))
    with torch.no_grad():
        sums, counts = zip(*(hf_models.reference_loss_sum(llama, {"input_ids": tokens})
                             for tokens in HELD_OUT.samples), strict=True)
        llama_logits = [llama(input_ids=tokens[None]).logits[0] for tokens in HELD_OUT.samples]
        qwen_logits = [hf_models.reference_logits(qwen, item) for item in items]
        qwen3_logits = [hf_models.reference_logits(qwen3, item) for item in qwen3_items]
    for report in reports:
        assert report["llama"]["val_loss"] == pytest.approx(float(sum(sums) / sum(counts)), rel=1e-9)
        for name, expected in (("llama", llama_logits), ("qwen2_vl", qwen_logits), ("qwen3_vl", qwen3_logits)):
            outputs = [output for batch in report[name]["predict"] for output in batch]
            assert len(outputs) == len(expected)
            for output, logits in zip(outputs, expected, strict=True):
                torch.testing.assert_close(output, logits, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scenario", ["llama_fsdp", "qwen2_vl_fsdp", "qwen2_vl_allgather", "qwen2_vl_group_free"])
def test_sharded_training_and_the_other_cp_modes_equal_the_plain_hf_loop(world, scenario):
    world_size, reports = world
    if world_size == 1:
        pytest.skip("sharding and CP modes need 2 or more processes")
    if scenario.endswith("_fsdp") and FSDP_UNSUPPORTED is not None:
        pytest.skip(FSDP_UNSUPPORTED)
    expected = _plain_hf_loop("llama" if scenario == "llama_fsdp" else "qwen2_vl")
    assert_parameters_match(reports[0][scenario]["params"], expected)  # FSDP gathers the full state to rank 0
    assert reports[0][scenario]["degree"] > 1 and reports[0][scenario]["rounds"] > 1


def test_image_tokens_that_do_not_match_the_grid_are_the_same_data_error_on_every_rank(world):
    _, reports = world
    kind, message = same_error_on_every_rank(reports, "bad_item")
    assert kind == DHPDataError.__name__
    assert f"dataset item {BAD_INDEX}" in message and "image tokens do not match image_grid_thw" in message


# -- single-process checks (no world) ------------------------------------------------------------


def _one_sample_batch(input_ids: torch.Tensor, **fields) -> dict:
    layout = ZigzagLayout([len(input_ids)], 1, 0)
    labels = torch.cat([input_ids[1:], input_ids.new_full((1,), -100)])[:len(input_ids)]
    info = DHPBatchInfo(layout, (0,), (0,), 0, 1, len(input_ids) - 1, len(input_ids) - 1, 1)
    return {"input_ids": input_ids, "labels": labels, "position_ids": layout.position_ids, "dhp": info, **fields}


def test_hf_builds_no_mask_for_the_dhp_attention_and_the_attention_gets_none(monkeypatch):
    model = hf_models.llama()
    HFModule(model)
    embeds = torch.zeros(1, 5, 16, dtype=torch.float64)
    assert create_causal_mask(model.config, embeds, None, None, torch.arange(5)[None]) is None
    masks = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return dhp_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, ATTENTION_NAME, spy)
    model(input_ids=torch.arange(5)[None], attention_mask=torch.ones(1, 5, dtype=torch.long))
    assert len(masks) == model.config.num_hidden_layers and all(mask is None for mask in masks)


@pytest.mark.parametrize(("model_class", "config", "reason"), [
    ("MistralForCausalLM", {"sliding_window": 4096}, "sliding-window attention"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 0}, "sliding-window attention"),
    ("Gemma2ForCausalLM", {"sliding_window": None, "layer_types": ["full_attention"] * 2},
     "soft-capped attention logits"),
    ("LlamaForCausalLM", {"attention_dropout": 0.1}, "attention dropout 0.1"),
    ("LlamaForSequenceClassification", {}, "is not a model HFModule can train"),
])
def test_models_whose_attention_cannot_be_routed_are_refused_naming_the_class(model_class, config, reason):
    import transformers

    model_type = getattr(transformers, model_class)
    size = {key: value for key, value in hf_models.TEXT.items() if not key.endswith("token_id")}
    model = model_type(model_type.config_class(**size, head_dim=4, **config))
    with pytest.raises(DHPConfigError, match=model_class) as error:
        HFModule(model)
    assert reason in str(error.value) and "supported: decoder-only" in str(error.value).lower()


def test_attention_the_config_check_cannot_see_is_refused_when_it_runs():
    model = hf_models.llama()
    HFModule(model)
    attention = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 3, 4, dtype=torch.float64)
    with pytest.raises(DHPConfigError, match="LlamaAttention asks for attention with sliding_window"):
        dhp_attention(attention, q, q[:, :2], q[:, :2], None, sliding_window=2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_loss_comes_from_the_logits_in_the_models_dtype_half_precision_upcast(dtype):
    model = hf_models.llama().to(dtype)
    task = HFModule(model)
    batch = _one_sample_batch(torch.arange(9) % 7)
    loss = task.loss(batch)
    logits = model(input_ids=batch["input_ids"][None]).logits[0]
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.nn.functional.cross_entropy(logits.to(expected_dtype), batch["labels"], reduction="sum") / 8
    assert loss.dtype == expected_dtype
    torch.testing.assert_close(loss, expected)


def test_an_idle_rank_gets_a_zero_loss_whose_graph_reaches_the_text_model():
    task = HFModule(hf_models.qwen_vl())
    batch = _one_sample_batch(torch.zeros(0, dtype=torch.long), position_ids=torch.zeros(0, 3, dtype=torch.long),
                              vision_rows=torch.zeros(0, dtype=torch.long), image_grid_thw=[], video_grid_thw=[])
    batch["dhp"] = dataclasses.replace(batch["dhp"], layout=ZigzagLayout([], 1, 0))
    loss = task.loss(batch)
    loss.backward()
    assert loss.item() == 0.0
    text = task.model.model.language_model
    assert all(p.grad is not None and not p.grad.any() for p in text.parameters())


def test_a_groups_vision_work_is_spread_over_its_ranks_by_image_and_temporal_patch():
    from lightning_dhp.hf.vision import _owners

    family = HFModule(hf_models.qwen_vl()).family
    batch = {"image_grid_thw": [torch.tensor([[1, 2, 4]]), torch.zeros(0, 3, dtype=torch.long)],
             "video_grid_thw": [torch.tensor([[8, 2, 2]]), torch.tensor([[3, 4, 4]])]}

    def group_units(split_videos):
        return [unit for sample in range(2) for unit in family.sample_units(batch, sample, split_videos)]

    units = group_units(True)
    assert [(unit.sample, unit.kind, unit.info) for unit in units] == [
        (0, "image", (1, 2, 4)), *[(0, "video", (1, 2, 2))] * 8, *[(1, "video", (1, 4, 4))] * 3]
    assert [unit.first_row for unit in units[:4]] == [0, 2, 3, 4] and units[-1].first_pixel == 32
    for degree in (2, 3, 5):  # degrees that do not divide the 8 or 3 temporal patches
        owners = _owners(units, degree)
        load = [sum(unit.cost for unit, owner in zip(units, owners, strict=True) if owner == rank)
                for rank in range(degree)]
        assert max(load) <= sum(load) / degree + max(unit.cost for unit in units)  # LPT's bound
        assert len(set(owners)) == degree
    assert [unit.info for unit in group_units(False)] == [(1, 2, 4), (8, 2, 2), (3, 4, 4)]


def test_an_items_vision_patches_come_from_its_grids():
    vision_patches = HFModule(hf_models.qwen_vl()).vision_patches
    items = hf_models.vl_items()
    assert vision_patches(items[-1]) == 1 * 2 * 2 + 2 * 4 * 4  # an image and a video
    assert vision_patches(items[1]) == 3 * 2 * 4 and vision_patches({"input_ids": torch.arange(3)}) == 0


def test_the_qwen_vl_item_transform_uses_the_models_rope_index_and_names_a_bad_item():
    model = hf_models.qwen_vl("2.5")
    transform = pickle.loads(pickle.dumps(HFModule(model).packing_options["item_transform"]))
    items = hf_models.vl_items()
    for item in (items[2], items[1], items[-1]):  # two images; text only; an image and a video
        out = transform(item)
        input_ids = item["input_ids"].reshape(1, -1)
        types = (input_ids == hf_models.IMAGE).long() + 2 * (input_ids == hf_models.VIDEO).long()
        expected, _ = model.model.get_rope_index(input_ids, types, item.get("image_grid_thw"),
                                                 item.get("video_grid_thw"))
        assert torch.equal(out["position_ids"], expected[:, 0].T)
        vision = types[0] > 0
        assert torch.equal(out["vision_rows"][vision], torch.arange(1, int(vision.sum()) + 1))
        assert not out["vision_rows"][~vision].any()
    bad = _bad_items()
    packing = DHPPacking(token_fields=["position_ids", "vision_rows"], item_transform=transform)
    with pytest.raises(DHPDataError, match=f"dataset item {BAD_INDEX} failed: .*image tokens do not match "
                                           r"image_grid_thw: .* lengths \[6\], but image_grid_thw=\[\[1, 4, 4\]\] "
                                           r"needs \[4\]"):
        packing.load(bad, BAD_INDEX, bad[BAD_INDEX]["input_ids"].numel())
    merged = dict(items[2], input_ids=items[2]["input_ids"].masked_fill(items[2]["input_ids"] == hf_models.END,
                                                                        hf_models.IMAGE))
    with pytest.raises(ValueError, match="image tokens do not match"):  # two images' tokens run together
        transform(merged)
    other_temporal_patch = dict(items[1], pixel_values_videos=items[1]["pixel_values_videos"][:, :12])
    with pytest.raises(ValueError, match=r"pixel_values_videos has rows of shape \(12,\) but this vision tower "
                                         r"takes patches of 24 values"):
        transform(other_temporal_patch)


@pytest.mark.parametrize("model_class", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                         "MistralForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM"])
def test_packed_samples_through_hfmodule_equal_each_sample_through_the_models_own_forward(model_class):
    import transformers

    model_type = getattr(transformers, model_class)
    torch.manual_seed(0)
    model = model_type(model_type.config_class(**hf_models.TEXT, head_dim=4, sliding_window=None)).double()
    samples = [torch.randint(0, hf_models.VOCAB, (length,)) for length in (7, 1, 12)]
    with torch.no_grad():
        expected = torch.cat([model(input_ids=tokens[None]).logits[0] for tokens in samples])
    task = HFModule(model)
    layout = ZigzagLayout([len(tokens) for tokens in samples], 1, 0)
    info = DHPBatchInfo(layout, (0,), (0, 1, 2), 0, 1, 17, 17, 3)
    batch = {"input_ids": torch.cat(samples), "position_ids": layout.position_ids, "dhp": info}
    with torch.no_grad(), cp_context(CPContext(layout, None, (0,))):
        logits = task(batch)
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-12)
