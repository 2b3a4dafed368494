"""Sharded DHP (``sharding="fsdp"``): FSDP2 over all ranks with per-batch CP groups, exact in float64.

One spawned world per size runs every scenario; parameters are gathered to full tensors and compared
with the plain single-process loop of ``tests.tiny_lm`` on the same global batches.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_dhp import DHPStrategy
from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning import DHPDataModule
from lightning_dhp.lightning.materialize import has_meta_tensors, materialize
from lightning_dhp.models import VLMTask
from lightning_dhp.models.tiny_vlm import DecoderLayer, TinyVLM, VisionBlock
from lightning_dhp.testing import run_distributed
from tests.helpers import (
    STEPS,
    as_torchrun_rank,
    assert_bf16_mixed_runs_match_single_device,
    assert_parameters_match,
    cpu_trainer,
    error_of,
    load_weights_from_rank_zero,
    plan_report,
    same_error_on_every_rank,
    single_device_training,
    single_device_two_optimizers,
    token_data,
)
from tests.test_models import TINY as TINY_VLM
from tests.tiny_lm import (
    HIDDEN,
    Block,
    LMTask,
    MixedPrecisionTask,
    TwoBackwardsTask,
    TwoOptimizerTask,
)

WORLD_SIZES = (2, 3)


def _full_params(task: LMTask) -> dict:
    state = get_model_state_dict(task, options=StateDictOptions(full_state_dict=True))
    return {name.removeprefix("model."): value.detach().clone() for name, value in state.items()}


def _scenarios(rank: int, world_size: int, directory: str) -> dict:
    as_torchrun_rank(rank)
    reports = {}

    def fit(task, steps=STEPS, ckpt_path=None, callbacks=(), trainer_kwargs=None, **strategy_kwargs):
        plans = plan_report()
        strategy = DHPStrategy(20, sharding="fsdp", **strategy_kwargs)
        trainer = cpu_trainer(world_size, strategy, steps, callbacks=[plans, *callbacks], **(trainer_kwargs or {}))
        trainer.fit(task, datamodule=token_data(), ckpt_path=ckpt_path)
        plan_list = [entry["plan"] for entry in plans.history]
        return trainer, {"params": _full_params(task),
                         "rounds": max(len(plan.rounds) for plan in plan_list),
                         "degree": max(g.degree for plan in plan_list for r in plan.rounds for g in r.groups),
                         "idle": sum(plan.stats()["idle_device_rounds"] for plan in plan_list)}

    reports["blocks"] = fit(LMTask(), fsdp_modules={Block})[1]
    # Lightning counts every optimizer's steps: 2 * STEPS optimizer steps train STEPS global batches
    reports["two_optimizers"] = fit(TwoOptimizerTask(in_turn=True), steps=2 * STEPS, fsdp_modules={Block})[1]
    reports["two_backwards"] = fit(TwoBackwardsTask(), fsdp_modules={Block})[1]
    mixed = MixedPrecisionTask()
    reports["bf16_mixed"] = {**fit(mixed, fsdp_modules={Block}, trainer_kwargs={"precision": "bf16-mixed"})[1],
                             "autocast": mixed.steps_under_bf16_autocast}
    reports["accumulate_clip_checkpointing"] = fit(
        LMTask(), fsdp_modules={Block}, activation_checkpointing={Block},
        trainer_kwargs={"accumulate_grad_batches": 2, "gradient_clip_val": 0.05})[1]
    checkpoints = ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    fit(LMTask(), steps=2, callbacks=[checkpoints], trainer_kwargs={"enable_checkpointing": True})
    reports["resumed"] = fit(LMTask(), ckpt_path=f"{directory}/step=2.ckpt")[1]
    distributed = ModelCheckpoint(dirpath=f"{directory}/distributed", every_n_train_steps=1, save_top_k=-1,
                                  filename="{step}")
    fit(LMTask(), steps=2, callbacks=[distributed], trainer_kwargs={"enable_checkpointing": True},
        save_distributed_checkpoint=True)
    reports["resumed_distributed"] = fit(LMTask(), ckpt_path=f"{directory}/distributed/step=2.ckpt",
                                         save_distributed_checkpoint=True)[1]
    if world_size == 3:  # checkpoints written by 2 ranks, resumed on 3 (the 2-process world ran first)
        reports["resumed_on_another_world"] = fit(LMTask(), ckpt_path=f"{directory}/../2/step=2.ckpt")[1]
        reports["resumed_distributed_on_another_world"] = fit(
            LMTask(), ckpt_path=f"{directory}/../2/distributed/step=2.ckpt", save_distributed_checkpoint=True)[1]
    reports["vlm"] = {mode: _fit_vlm(world_size, **kwargs) for mode, kwargs in (
        ("replicate", {}), ("fsdp", {"sharding": "fsdp", "fsdp_modules": {DecoderLayer, VisionBlock}}))}
    trainer = cpu_trainer(world_size, DHPStrategy(20, sharding="fsdp", fsdp_modules={Block}), STEPS)
    with trainer.init_module(empty_init=True):
        task = PretrainedLM()
    built_on_meta = all(parameter.is_meta for parameter in task.parameters())
    trainer.fit(task, datamodule=token_data())
    reports["meta_init"] = {"params": _full_params(task), "built_on_meta": built_on_meta,
                            "local": sum(parameter.to_local().numel() for parameter in task.parameters()),
                            "total": sum(parameter.numel() for parameter in task.parameters())}
    partly = LMTask()
    with torch.device("meta"):
        partly.model.block = Block()
    reports["partly_on_meta"] = error_of(lambda: fit(partly))
    with torch.device("meta"):
        uninitialisable = LMTask()
        uninitialisable.model.block.scale = NoReset()
    reports["no_reset_parameters"] = error_of(lambda: fit(uninitialisable))
    reports["no_block_matches"] = error_of(lambda: fit(LMTask(), fsdp_modules={torch.nn.LSTM}))
    reports["bad_precision"] = error_of(lambda: fit(LMTask(), trainer_kwargs={"precision": "16-true"}))
    return reports


class PretrainedLM(LMTask):
    """Built on the meta device; rank 0 loads the weights (as a pretrained checkpoint) once the strategy has
    sharded and materialised the model, and they reach every rank's shards."""

    def on_fit_start(self) -> None:
        load_weights_from_rank_zero(self, lambda: LMTask().model.state_dict())


class NoReset(torch.nn.Module):
    """A parameter holder without reset_parameters: built on the meta device, nothing could initialise it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(HIDDEN, dtype=torch.float64))


def _fit_vlm(world_size: int, **strategy_kwargs) -> dict:
    """The tiny VLM for 2 steps on short videos: some ranks hold frames in a round, others none, so the
    vision tower runs on zero frames there (sharded on its own under FSDP, it gathers on every rank)."""
    torch.manual_seed(0)
    task = VLMTask(TINY_VLM, warmup_steps=0)
    videos = VideoDigits(12, seed=3, durations_s=[4.0, 12.0, 24.0], sample_fps=0.25, frame_sizes=(8, 16))
    data = DHPDataModule(videos, videos.lengths.tolist(), 4, seed=0)
    trainer = cpu_trainer(world_size, DHPStrategy(20, **strategy_kwargs), 2, precision="64-true")
    trainer.fit(task, datamodule=data)
    return _full_params(task)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"{size}-process" for size in WORLD_SIZES])
def world(request, saved) -> tuple[int, list[dict]]:
    directory = f"{saved}/{request.param}"
    return request.param, run_distributed(_scenarios, request.param, directory, timeout_s=300)


# Every sharded scenario that trains: each rank's full parameters equal single-device float64 training.
REFERENCES = {
    "plain": single_device_training,
    "accumulate_clip": lambda: single_device_training(accumulate=2, clip=0.05),
    "two_optimizers": single_device_two_optimizers,
}
EXACT_RUNS = [  # (scenario, reference, world sizes that run it)
    pytest.param("blocks", "plain", WORLD_SIZES, id="fsdp-modules"),
    pytest.param("two_optimizers", "two_optimizers", WORLD_SIZES, id="manual-two-optimizers"),
    pytest.param("two_backwards", "plain", WORLD_SIZES, id="manual-two-backwards-per-round"),
    pytest.param("accumulate_clip_checkpointing", "accumulate_clip", WORLD_SIZES,
                 id="accumulation-clipping-activation-checkpointing"),
    pytest.param("meta_init", "plain", WORLD_SIZES, id="built-on-meta-pretrained-from-rank-0"),
    pytest.param("resumed", "plain", WORLD_SIZES, id="full-checkpoint-resumed"),
    pytest.param("resumed_distributed", "plain", WORLD_SIZES, id="distributed-checkpoint-resumed"),
    # the 3-process world resumes the 2-process world's checkpoints
    pytest.param("resumed_on_another_world", "plain", (3,), id="full-checkpoint-resumed-on-3-from-2"),
    pytest.param("resumed_distributed_on_another_world", "plain", (3,),
                 id="distributed-checkpoint-resumed-on-3-from-2"),
]


@pytest.mark.parametrize(("scenario", "reference", "world_sizes"), EXACT_RUNS)
def test_sharded_training_equals_single_device_training(world, scenario, reference, world_sizes):
    world_size, reports = world
    if world_size not in world_sizes:
        pytest.skip(f"runs on {world_sizes} processes")
    expected = REFERENCES[reference]()
    for report in reports:
        assert_parameters_match(report[scenario]["params"], expected)


def test_the_sharded_runs_use_several_rounds_and_context_parallelism(world):
    world_size, reports = world
    for scenario in ("blocks", "two_optimizers"):
        assert reports[0][scenario]["rounds"] > 1 and reports[0][scenario]["degree"] > 1, scenario
    if world_size == 3:
        assert reports[0]["blocks"]["degree"] == 2, "degree 2 on 3 ranks: some rank is idle or alone"


def test_sharded_bf16_mixed_training_matches_single_device_bf16_mixed(world):
    _, reports = world
    assert_bf16_mixed_runs_match_single_device([report["bf16_mixed"] for report in reports])


def test_a_model_built_on_the_meta_device_is_only_ever_allocated_in_shards(world):
    world_size, reports = world  # and trains exactly: test_sharded_training_equals_single_device_training
    for report in reports:
        meta_init = report["meta_init"]
        assert meta_init["built_on_meta"]
        assert meta_init["local"] <= -(-meta_init["total"] // world_size) + 64  # a shard, plus FSDP's row padding


def test_the_tiny_vlm_sharded_with_its_vision_blocks_equals_its_replicated_training(world):
    _, reports = world
    for report in reports:  # replicated DHP training equals single-device training (tests/test_models.py)
        assert_parameters_match(report["vlm"]["fsdp"], report["vlm"]["replicate"])


class CallsABlockOnRankZeroOnly(LMTask):
    """A user bug: one more call of a sharded module on rank 0 only (FSDP gathers its parameters)."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_rank == 0 and batch_idx == 1:  # after the first step set FSDP up
            hidden = torch.zeros(len(batch["input_ids"]), HIDDEN, dtype=torch.float64)
            self.model.block(hidden, batch["position_ids"])
        return super().training_step(batch, batch_idx)


def _some_ranks_only(rank: int, world_size: int) -> tuple[str, str]:
    as_torchrun_rank(rank)
    strategy = DHPStrategy(20, sharding="fsdp", fsdp_modules={Block})
    trainer = cpu_trainer(world_size, strategy, STEPS)
    return error_of(lambda: trainer.fit(CallsABlockOnRankZeroOnly(), datamodule=token_data()))


def test_a_sharded_module_called_on_some_ranks_only_fails_within_the_timeout_naming_the_cause():
    # gloo may abort the rank left waiting in a later collective; the one stuck in the gather explains
    reports = run_distributed(_some_ranks_only, 2, timeout_s=120, collective_timeout_s=8, allow_dead_ranks=True)
    survivors = [report for report in reports if report is not None]
    assert survivors, "no rank survived to report the error"
    for kind, message in survivors:
        assert kind != "ok"
        assert "a sharded module called on some ranks only" in message, message


def test_the_full_checkpoint_loads_without_any_distributed_setup(world, saved):
    world_size, _ = world
    checkpoint = torch.load(f"{saved}/{world_size}/step=2.ckpt", weights_only=False)
    task = LMTask()
    task.load_state_dict(checkpoint["state_dict"])
    assert_parameters_match({name: value for name, value in task.model.state_dict().items()},
                         single_device_training(2))


@pytest.mark.parametrize(("scenario", "fragments"), [
    ("partly_on_meta", ["partly on the meta device", "model.embed.weight", "init_module(empty_init=True)"]),
    ("no_reset_parameters", ["built on the meta device", "['NoReset'] define no reset_parameters()"]),
    ("no_block_matches", ["fsdp_modules={LSTM}", "matches no module", "Block"]),
    ("bad_precision", ["sharding='fsdp' supports precision", "'16-true'"]),
])
def test_bad_sharding_input_is_the_same_clear_error_everywhere(world, scenario, fragments):
    _, reports = world
    kind, message = same_error_on_every_rank(reports, scenario)
    assert kind == "DHPConfigError", message
    for fragment in fragments:
        assert fragment in message


def test_fsdp_on_one_device_keeps_the_model_whole_and_resumes_exactly(tmp_path):
    """sharding="fsdp" with one process trains unsharded, and its checkpoints resume like any other, also
    into a model built on the meta device (restored after it is materialised)."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    cpu_trainer(1, DHPStrategy(64, sharding="fsdp"), 2, callbacks=[checkpoints],
             enable_checkpointing=True).fit(LMTask(), datamodule=token_data())
    trainer = cpu_trainer(1, DHPStrategy(64, sharding="fsdp"), STEPS)
    with trainer.init_module(empty_init=True):
        task = LMTask()
    trainer.fit(task, datamodule=token_data(), ckpt_path=f"{tmp_path}/step=2.ckpt")
    assert_parameters_match(task.model.state_dict(), single_device_training())


def test_unknown_sharding_values_are_refused():
    with pytest.raises(DHPConfigError, match="save_distributed_checkpoint needs sharding='fsdp'"):
        DHPStrategy(save_distributed_checkpoint=True)
    with pytest.raises(DHPConfigError, match="sharding must be one of"):
        DHPStrategy(sharding="zero3")
    with pytest.raises(DHPConfigError, match="fsdp_modules needs sharding='fsdp'"):
        DHPStrategy(fsdp_modules={Block})


def test_a_model_materialised_from_the_meta_device_gets_its_own_initialisation():
    # children first, then parents: TinyVLM's reset_parameters (small normal weights, rotary frequencies)
    # must win over each Linear's own (uniform, std 1/sqrt(3 fan_in))
    torch.manual_seed(0)
    built = TinyVLM(TINY_VLM)
    with torch.device("meta"):
        materialised = TinyVLM(TINY_VLM)
    materialize(materialised, torch.device("cpu"))
    assert not has_meta_tensors(materialised)
    torch.testing.assert_close(materialised.inv_freq, built.inv_freq, rtol=0, atol=0)
    for (name, value), expected in zip(materialised.named_parameters(), built.parameters(), strict=True):
        if name.endswith("weight") and value.dim() == 2:  # linear and embedding weights: normal, std 0.02
            assert abs(float(value.std()) - float(expected.std())) < 0.2 * float(expected.std()), name
        elif "norm" in name:  # layer norms and RMS norms: their own reset (ones, zeros)
            torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_a_torch_whose_fsdp2_cannot_reduce_scatter_unused_parameters_is_refused_saying_why(monkeypatch):
    from torch.distributed.fsdp import FSDPModule

    monkeypatch.delattr(FSDPModule, "set_reduce_scatter_unused_params", raising=False)  # as in torch 2.11
    with pytest.raises(DHPConfigError, match=r"sharding='fsdp' needs FSDP2's set_reduce_scatter_unused_params, "
                                             r"which torch .* lacks .*use torch >= 2.13, or sharding='replicate'"):
        DHPStrategy(sharding="fsdp")
    DHPStrategy(sharding="replicate")
