"""The Lightning features a user reaches for, under DHP, against float64 single-device references.

One spawned world per size (1, 2 and 3 processes) runs every scenario and reports what it saw; the
tests compare each report with a plain PyTorch loop on the same global batches (``tests.tiny_lm``),
which uses neither the planner, nor packing, nor ``cp_attention``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BasePredictionWriter, EarlyStopping
from torch._dynamo.utils import counters  # Dynamo's own tally of compiled graphs and graph breaks
from torch.utils.data import DataLoader

from lightning_dhp import DHPStrategy, loss_share
from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.distributed import CPContext, cp_context
from lightning_dhp.errors import DHPConfigError, DHPDataError
from lightning_dhp.lightning import DHPBatchSampler, DHPDataModule, DHPPacking, global_share
from lightning_dhp.models import TinyVLMConfig, VLMTask, single_process_batch
from lightning_dhp.testing import run_distributed
from tests.helpers import (
    BATCHES,
    GLOBAL_BATCH,
    LENGTHS,
    STEPS,
    as_torchrun_rank,
    assert_bf16_mixed_runs_match_single_device,
    assert_parameters_match,
    assert_within_bf16_rounding,
    cpu_trainer,
    error_of,
    plan_report,
    same_error_on_every_rank,
    single_device_training,
    single_device_two_optimizers,
    tokens_for_full_degree,
)
from tests.tiny_lm import (
    Block,
    LMTask,
    MixedPrecisionTask,
    TinyLM,
    TokenDataset,
    TwoBackwardsTask,
    TwoOptimizerTask,
    dense_causal_attention,
    reference_mean_loss,
    reference_training,
)

# On 2+ processes the longest sample (37 tokens) needs CP degree 2; batches need several rounds everywhere.
TOKENS_PER_DEVICE = {1: 64, 2: 20, 3: 20}
WORLD_SIZES = (1, 2, 3)


class StepLosses(Callback):
    """The logged ``train_loss`` of every step, as Lightning holds it."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["train_loss_step"]))


class ManualTask(LMTask):
    """Manual optimization, the documented DHP pattern: backward every round, step in the last."""

    def __init__(self, textbook: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.textbook = textbook

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        if self.textbook:  # zero_grad, backward, step on every call: wrong when a batch has several rounds
            optimizer.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)
        if self.textbook or batch["dhp"].is_last_round:
            optimizer.step()
            optimizer.zero_grad()
        return loss


class SkipTask(LMTask):
    """Returns None for the second global batch, on the given ranks (None: every rank)."""

    def __init__(self, skipping_ranks: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.skipping_ranks = skipping_ranks

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = super().training_step(batch, batch_idx)
        skipping = self.skipping_ranks is None or self.global_rank in self.skipping_ranks
        return None if batch_idx == 1 and skipping else loss


class CompiledTask(LMTask):
    """The block under ``torch.compile``, with the aot_eager backend: Dynamo and AOTAutograd as with the
    default backend, without inductor's C++ build (minutes on a cold cache)."""

    def configure_model(self) -> None:
        self.model.block = torch.compile(self.model.block, backend="aot_eager")


class BuiltOnMeta(LMTask):
    """Replicated, built on the meta device: the strategy materialises it on every rank (rank 0's values win),
    then every rank loads the same weights, as from a pretrained checkpoint."""

    def __init__(self) -> None:
        with torch.device("meta"):
            super().__init__()

    def on_fit_start(self) -> None:
        self.model.load_state_dict(LMTask().model.state_dict())


class RecordingWriter(BasePredictionWriter):
    """A prediction writer on every batch and at the epoch's end, recording (dataset indices, outputs)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.batches: list[tuple[list[int], list]] = []
        self.epoch: list[tuple[list[int], list]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.batches.append((list(batch_indices), prediction))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
        # one loader: predictions per batch, indices per loader and batch (Lightning's shapes)
        self.epoch = [(list(indices), prediction) for indices, prediction in zip(batch_indices[0], predictions,
                                                                                  strict=True)]


class PerRankBatchSizeTask(LMTask):
    """Logs with ``batch_size`` = the samples of this rank's group and ``sync_dist=True``, as a Lightning user
    weighting epoch means would; under DHP the weight of a logged share is the global batch size."""

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["dhp"].sample_indices))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), sync_dist=True, batch_size=len(batch["dhp"].sample_indices))


class AccuracyTask(LMTask):
    """Logs token accuracy with ``global_share``, as a user logs any mean over the global batch."""

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(batch["input_ids"], batch["position_ids"])
        correct = (logits.argmax(-1) == batch["labels"]).sum().double()
        self.log("val_accuracy", global_share(correct, batch))


def _data(num_workers: int = 0) -> DHPDataModule:
    validation = TokenDataset(LENGTHS, seed=1)
    return DHPDataModule(TokenDataset(LENGTHS), LENGTHS, GLOBAL_BATCH, seed=0, val_dataset=validation,
                         val_lengths=LENGTHS, test_dataset=validation, test_lengths=LENGTHS,
                         predict_dataset=validation, predict_lengths=LENGTHS, num_workers=num_workers)


# The main job's model (a tiny TinyVLM, float32 weights) under bf16-mixed: a float32 RoPE makes q and k float32
# while v comes out of its projection in bf16, which cp_attention must take as SDPA does.
VLM_CONFIG = TinyVLMConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                           max_patches_per_side=4, vision_hidden_size=16, vision_layers=1, vision_heads=2,
                           vision_intermediate_size=32)
VLM_DIGITS = VideoDigits(9, seed=3, durations_s=[4.0, 12.0, 24.0], sample_fps=0.25, frame_sizes=(8, 16))
VLM_LENGTHS = [len(VLM_DIGITS[index]["input_ids"]) for index in range(len(VLM_DIGITS))]
VLM_BATCH = 3  # 9 samples: 3 global batches an epoch


class SGDVLMTask(VLMTask):
    """The main job's task with plain SGD: updates proportional to gradients, so bf16 rounding shows as a small
    share of each update (AdamW's normalised steps turn rounding of near-zero gradients into sign flips)."""

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0), "interval": "step"}}


def _vlm_task() -> VLMTask:
    torch.manual_seed(0)
    return SGDVLMTask(VLM_CONFIG)


def _vlm_reference(steps: int) -> dict:
    """Single-process bf16-mixed training: each global batch's step under CPU bf16 autocast, backward outside it."""
    task = _vlm_task()
    optimization = task.configure_optimizers()
    optimizer, scheduler = optimization["optimizer"], optimization["lr_scheduler"]["scheduler"]
    for indices in DHPBatchSampler(VLM_LENGTHS, VLM_BATCH, seed=0).batches()[:steps]:
        batch = single_process_batch([VLM_DIGITS[index] for index in indices], indices)
        with torch.autocast("cpu", dtype=torch.bfloat16), cp_context(CPContext(batch["dhp"].layout, None, (0,))):
            loss = task.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {name: value.detach().clone() for name, value in task.model.state_dict().items()}


def _params(task: LMTask) -> dict:
    """The task's parameters, named without the ``model.`` prefix (as ``reference_training`` names them)."""
    return {name.removeprefix("model."): value.detach().clone() for name, value in task.state_dict().items()}


def _scenarios(rank: int, world_size: int) -> dict:
    as_torchrun_rank(rank)
    tokens = TOKENS_PER_DEVICE[world_size]
    reports = {}

    def fit(task, *, steps=STEPS, num_workers=0, precision="32-true", **strategy_kwargs):
        losses, plans = StepLosses(), plan_report()
        callbacks = [plans] + ([losses] if task.automatic_optimization else [])
        trainer = cpu_trainer(world_size, DHPStrategy(tokens, **strategy_kwargs), steps, callbacks=callbacks,
                           precision=precision)
        trainer.fit(task, datamodule=_data(num_workers))
        plan_list = [entry["plan"] for entry in plans.history]
        return trainer, {"params": _params(task), "losses": losses.values, "global_step": trainer.global_step,
                         "rounds": max(len(plan.rounds) for plan in plan_list),
                         "degree": max(g.degree for plan in plan_list for r in plan.rounds for g in r.groups),
                         "idle": sum(plan.stats()["idle_device_rounds"] for plan in plan_list)}

    for name, checkpoint, option in (("checkpoint_non_reentrant", "non-reentrant", None),
                                     ("checkpoint_reentrant", "reentrant", None),
                                     ("checkpoint_option", None, {Block})):
        task = LMTask(checkpoint=checkpoint)
        trainer, reports[name] = fit(task, activation_checkpointing=option)
        if name == "checkpoint_option":  # the same trained model, evaluated as a user would
            reports["train_loss_epoch"] = float(trainer.callback_metrics["train_loss_epoch"])
            reports["val_loss"] = trainer.validate(task, datamodule=_data(), verbose=False)[0]["val_loss"]
            reports["test_loss"] = trainer.test(task, datamodule=_data(), verbose=False)[0]["test_loss"]
    accuracy = AccuracyTask()
    reports["val_accuracy"] = cpu_trainer(world_size, DHPStrategy(tokens)).validate(
        accuracy, datamodule=_data(), verbose=False)[0]["val_accuracy"]
    writer = RecordingWriter()
    reports["predict"] = cpu_trainer(world_size, DHPStrategy(tokens), callbacks=[writer]).predict(LMTask(),
                                                                                               datamodule=_data())
    reports["prediction_writer"] = {"batches": writer.batches, "epoch": writer.epoch}
    # a profiled cost model: every rank must plan with rank 0's, or the plans would differ
    reports["workers_and_scheduler"] = fit(LMTask(lr_gamma=0.5), num_workers=1, cost_model="profile")[1]
    reports["manual"] = fit(ManualTask())[1]
    # Lightning counts every optimizer's steps: 2 * STEPS optimizer steps train STEPS global batches
    reports["two_optimizers"] = fit(TwoOptimizerTask(), steps=2 * STEPS)[1]
    reports["two_optimizers_in_turn"] = fit(TwoOptimizerTask(in_turn=True), steps=2 * STEPS)[1]
    reports["two_backwards"] = fit(TwoBackwardsTask())[1]
    batch_sized = PerRankBatchSizeTask()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(batch_sized)
        reports["per_rank_batch_size"] = {
            "train_loss_epoch": float(trainer.callback_metrics["train_loss_epoch"]),
            "val_loss": trainer.validate(batch_sized, datamodule=_data(), verbose=False)[0]["val_loss"]}
    reports["per_rank_batch_size"]["warnings"] = [str(w.message) for w in caught if "batch_size" in str(w.message)]
    reports["built_on_meta"] = fit(BuiltOnMeta())[1]
    counters.clear()
    compiled = fit(CompiledTask())[1]
    compiled["params"] = {name.replace("._orig_mod", ""): value for name, value in compiled["params"].items()}
    reports["compiled"] = {**compiled, "graphs": counters["stats"]["unique_graphs"],
                           "graph_breaks": list(counters["graph_break"])}
    mixed = MixedPrecisionTask()
    reports["bf16_mixed"] = {**fit(mixed, precision="bf16-mixed")[1], "autocast": mixed.steps_under_bf16_autocast}
    vlm = _vlm_task()
    plans = plan_report()
    cpu_trainer(world_size, DHPStrategy(tokens_for_full_degree(VLM_LENGTHS, world_size)), STEPS, callbacks=[plans],
             precision="bf16-mixed").fit(vlm, datamodule=DHPDataModule(VLM_DIGITS, VLM_LENGTHS, VLM_BATCH, seed=0))
    reports["vlm_bf16_mixed"] = {
        "params": {name: value.detach().clone() for name, value in vlm.model.state_dict().items()},
        "degree": max(g.degree for entry in plans.history for r in entry["plan"].rounds for g in r.groups)}
    reports["manual_textbook"] = error_of(lambda: fit(ManualTask(textbook=True)))
    reports["skip_every_rank"] = fit(SkipTask(), steps=STEPS)[1]
    if world_size > 1:
        reports["skip_some_ranks"] = error_of(lambda: fit(SkipTask(skipping_ranks=(1,))))
    custom_collate = DataLoader(TokenDataset(LENGTHS), batch_sampler=DHPBatchSampler(LENGTHS, GLOBAL_BATCH),
                                collate_fn=lambda items: items)
    reports["custom_collate"] = error_of(
        lambda: cpu_trainer(world_size, DHPStrategy(tokens)).fit(LMTask(), train_dataloaders=custom_collate))
    reports["checkpoint_no_match"] = error_of(lambda: fit(LMTask(), activation_checkpointing={torch.nn.LSTM}))
    # EarlyStopping on the logged validation loss, checked after every step (Lightning would check at the
    # epoch's end, since it reads val_check_interval=1 as 1.0): the threshold lies between the single-device
    # validation losses after steps 1 and 2, so every rank has to stop after step 2
    after = _reference_validation_losses(steps=2)
    stopper = EarlyStopping(monitor="val_loss", stopping_threshold=(after[0] + after[1]) / 2,
                            check_on_train_epoch_end=False)
    trainer = cpu_trainer(world_size, DHPStrategy(tokens), STEPS + 1, callbacks=[stopper], val_check_interval=1)
    trainer.fit(LMTask(), datamodule=_data())
    reports["early_stopping"] = {"after": after, "global_step": trainer.global_step, "stopped": trainer.should_stop}
    return reports


def _reference_validation_losses(steps: int) -> list[float]:
    """The single-device validation loss after each of the first ``steps`` training steps."""
    validation = DHPBatchSampler(LENGTHS, GLOBAL_BATCH, shuffle=False).batches()
    return [reference_mean_loss(single_device_training(step), LENGTHS, validation, seed=1)
            for step in range(1, steps + 1)]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"{size}-process" for size in WORLD_SIZES])
def world(request) -> tuple[int, list[dict]]:
    return request.param, run_distributed(_scenarios, request.param, timeout_s=420)



# Every scenario that trains: each rank's parameters equal single-device float64 training (the reference named,
# from tests.tiny_lm), after the optimizer steps Lightning counts; the test data needs several rounds and, on 2+
# processes, context parallelism.
REFERENCES = {
    "plain": single_device_training,
    "lr_schedule": lambda: single_device_training(lr_gamma=0.5),
    "two_optimizers": single_device_two_optimizers,
    # Lightning counts the skipped batch as a step (as on one device): STEPS steps train batches 0 and 2
    "without_the_second_batch": lambda: reference_training(LENGTHS, [BATCHES[0], BATCHES[2]], STEPS - 1),
}
EXACT_RUNS = [  # (scenario, reference, optimizer steps)
    pytest.param("checkpoint_non_reentrant", "plain", STEPS, id="activation-checkpointing-non-reentrant"),
    pytest.param("checkpoint_reentrant", "plain", STEPS, id="activation-checkpointing-reentrant"),
    pytest.param("checkpoint_option", "plain", STEPS, id="activation-checkpointing-option"),
    # loader workers, a learning rate schedule and a profiled cost model (every rank plans with rank 0's)
    pytest.param("workers_and_scheduler", "lr_schedule", STEPS, id="workers-schedule-profiled-cost-model"),
    pytest.param("manual", "plain", STEPS, id="manual-optimization"),  # the documented pattern
    # a backward per optimizer in every round, steps in the last; Lightning counts every optimizer's steps
    pytest.param("two_optimizers", "two_optimizers", 2 * STEPS, id="two-optimizers"),
    pytest.param("two_optimizers_in_turn", "two_optimizers", 2 * STEPS, id="two-optimizers-in-turn"),
    pytest.param("two_backwards", "plain", STEPS, id="two-backwards-per-round"),
    pytest.param("built_on_meta", "plain", STEPS, id="replicated-built-on-meta"),
    pytest.param("compiled", "plain", STEPS, id="compiled-block"),
    pytest.param("skip_every_rank", "without_the_second_batch", STEPS, id="none-from-every-rank-skips"),
]


@pytest.mark.parametrize(("scenario", "reference", "steps"), EXACT_RUNS)
def test_lightning_features_train_exactly(world, scenario, reference, steps):
    world_size, reports = world
    expected = REFERENCES[reference]()
    for report in reports:
        assert_parameters_match(report[scenario]["params"], expected)
        assert report[scenario]["global_step"] == steps
    assert reports[0][scenario]["rounds"] > 1, "the test data should need several rounds"
    if world_size > 1:
        assert reports[0][scenario]["degree"] > 1, "the test data should use context parallelism"


def test_logged_training_loss_is_the_global_loss_every_step_and_epoch(world):
    _, reports = world
    losses: list[float] = []
    reference_training(LENGTHS, BATCHES, STEPS, losses=losses)
    for report in reports:
        assert report["checkpoint_option"]["losses"] == pytest.approx(losses, rel=1e-9)
        epoch_mean = sum(loss * len(batch) for loss, batch in zip(losses, BATCHES, strict=False)) / sum(
            len(batch) for batch in BATCHES[:STEPS])
        assert report["train_loss_epoch"] == pytest.approx(epoch_mean, rel=1e-9)


def test_logged_validation_and_test_losses_equal_single_device_values(world):
    _, reports = world
    trained = single_device_training()
    expected = reference_mean_loss(trained, LENGTHS, DHPBatchSampler(LENGTHS, GLOBAL_BATCH, shuffle=False).batches(),
                                   seed=1)
    for report in reports:
        assert report["val_loss"] == pytest.approx(expected, rel=1e-9)
        assert report["test_loss"] == pytest.approx(expected, rel=1e-9)


def test_a_logged_global_share_is_the_global_mean(world):
    _, reports = world
    model = LMTask().model
    samples = TokenDataset(LENGTHS, seed=1).samples
    batches = DHPBatchSampler(LENGTHS, GLOBAL_BATCH, shuffle=False).batches()
    means = []
    with torch.no_grad():
        for batch in batches:
            correct = sum(int((model(samples[i], torch.arange(len(samples[i])), dense_causal_attention)[:-1]
                               .argmax(-1) == samples[i][1:]).sum()) for i in batch)
            means.append(correct / sum(len(samples[i]) - 1 for i in batch))
    expected = sum(mean * len(batch) for mean, batch in zip(means, batches, strict=True)) / len(LENGTHS)
    for report in reports:
        assert report["val_accuracy"] == pytest.approx(expected, rel=1e-9)


def test_predict_returns_each_samples_output_in_dataset_order(world):
    _, reports = world
    model = LMTask().model
    samples = TokenDataset(LENGTHS, seed=1).samples
    with torch.no_grad():
        expected = [model(tokens, torch.arange(len(tokens)), dense_causal_attention) for tokens in samples]
    for report in reports:
        outputs = [output for batch in report["predict"] for output in batch]
        assert len(outputs) == len(LENGTHS)
        for index, output in enumerate(outputs):
            torch.testing.assert_close(output["logits"], expected[index], rtol=1e-9, atol=1e-12)
            assert output["length"] > 0


def test_a_prediction_writer_gets_each_outputs_dataset_index_on_every_batch_and_at_the_epochs_end(world):
    _, reports = world
    model = LMTask().model
    samples = TokenDataset(LENGTHS, seed=1).samples
    batches = DHPBatchSampler(LENGTHS, GLOBAL_BATCH, shuffle=False).batches()
    for report in reports:
        for written in (report["prediction_writer"]["batches"], report["prediction_writer"]["epoch"]):
            assert [indices for indices, _ in written] == batches
            for indices, outputs in written:
                for index, output in zip(indices, outputs, strict=True):
                    tokens = samples[index]
                    with torch.no_grad():
                        expected = model(tokens, torch.arange(len(tokens)), dense_causal_attention)
                    torch.testing.assert_close(output["logits"], expected, rtol=1e-9, atol=1e-12)


def test_a_per_rank_batch_size_in_self_log_is_ignored_with_one_warning_and_values_stay_global(world):
    _, reports = world
    losses: list[float] = []
    trained = reference_training(LENGTHS, BATCHES, STEPS, losses=losses)
    epoch_mean = sum(loss * len(batch) for loss, batch in zip(losses, BATCHES, strict=False)) / sum(
        len(batch) for batch in BATCHES[:STEPS])
    validation = reference_mean_loss(trained, LENGTHS, DHPBatchSampler(LENGTHS, GLOBAL_BATCH, shuffle=False).batches(),
                                     seed=1)
    for rank, report in enumerate(reports):
        logged = report["per_rank_batch_size"]
        assert logged["train_loss_epoch"] == pytest.approx(epoch_mean, rel=1e-9)
        assert logged["val_loss"] == pytest.approx(validation, rel=1e-9)
        if rank == 0:  # Lightning's rank-zero warning: once per run and logged name
            assert len(logged["warnings"]) == 2, logged["warnings"]
            assert all("global batch size" in message for message in logged["warnings"])


def test_bf16_mixed_training_runs_under_autocast_and_matches_single_device_bf16_mixed(world):
    _, reports = world
    assert_bf16_mixed_runs_match_single_device([report["bf16_mixed"] for report in reports])


def test_the_main_jobs_model_trains_under_bf16_mixed_like_single_device_bf16_mixed(world):
    world_size, reports = world
    expected, initial = _vlm_reference(STEPS), _vlm_reference(0)
    for report in reports:
        assert_within_bf16_rounding(report["vlm_bf16_mixed"]["params"], expected, initial)
    assert reports[0]["vlm_bf16_mixed"]["degree"] == world_size


def test_a_compiled_block_breaks_its_graph_only_at_cp_attention(world):
    _, reports = world  # its training is exact: test_lightning_features_train_exactly[compiled-block]
    for report in reports:
        assert report["compiled"]["graphs"] >= 1
        # the plan-dependent attention stays eager (tracing it would recompile for every layout)
        graph_breaks = report["compiled"]["graph_breaks"]
        assert graph_breaks and all("cp_attention" in reason for reason in graph_breaks)


def test_manual_optimization_stepping_every_round_is_refused(world):
    _, reports = world
    kind, message = same_error_on_every_rank(reports, "manual_textbook")
    assert kind == "DHPConfigError", message
    assert "is_last_round" in message and "round 1 of" in message


def test_none_from_some_ranks_only_is_the_same_clear_error_everywhere(world):
    world_size, reports = world
    if world_size == 1:
        pytest.skip("needs two ranks")
    kind, message = same_error_on_every_rank(reports, "skip_some_ranks")
    assert kind == "DHPRankMismatchError", message
    assert "returned None on ranks [1]" in message


@pytest.mark.parametrize(("scenario", "fragments"), [
    ("custom_collate", ["collate_fn", "DHPPacking(item_transform="]),
    ("checkpoint_no_match", ["activation_checkpointing={LSTM}", "matches no module", "Block"]),
])
def test_bad_configuration_is_the_same_clear_error_everywhere(world, scenario, fragments):
    _, reports = world
    kind, message = same_error_on_every_rank(reports, scenario)
    assert kind == "DHPConfigError", message
    for fragment in fragments:
        assert fragment in message


def test_early_stopping_on_the_global_validation_loss_stops_every_rank_at_the_same_step(world):
    _, reports = world
    for report in reports:
        first, second = report["early_stopping"]["after"]
        assert second < first  # the threshold between them can only be crossed at step 2
        assert report["early_stopping"]["stopped"] and report["early_stopping"]["global_step"] == 2


# -- without processes -------------------------------------------------------------------------------


def test_field_kinds_are_declared_never_guessed_from_shapes():
    from lightning_dhp.attention import ZigzagLayout

    items = [{"input_ids": torch.arange(8), "per_sample": torch.ones(8), "flags": torch.arange(8) % 2}
             for _ in range(3)]
    layout = ZigzagLayout([8, 8, 8], 2, 1)
    with pytest.warns(UserWarning, match="'per_sample' has one row per token"):  # shaped like tokens: named
        batch = DHPPacking(token_fields={"flags"}).collate_group(items, layout)
    assert isinstance(batch["per_sample"], list) and len(batch["per_sample"]) == 3
    assert torch.equal(batch["flags"], layout.shard(torch.cat([item["flags"] for item in items])))
    assert torch.equal(batch["input_ids"], layout.shard(torch.arange(8).repeat(3)))


def test_a_declared_token_field_of_the_wrong_length_names_the_dataset_index():
    dataset = [{"input_ids": torch.arange(5), "flags": torch.zeros(4)}]
    with pytest.raises(DHPDataError, match=r"dataset item 0: token field 'flags'.*5 rows"):
        DHPPacking(token_fields=["flags"]).load(dataset, 0, 5)


def test_an_item_transform_runs_before_the_checks():
    dataset = [{"tokens": torch.arange(5)}]
    item = DHPPacking(item_transform=lambda raw: {"input_ids": raw["tokens"]}).load(dataset, 0, 5)
    assert torch.equal(item["input_ids"], torch.arange(5))


def test_bad_lengths_are_found_when_the_loader_is_built_naming_dataset_indices():
    with pytest.raises(DHPDataError, match=r"dataset items \[2, 4\].*lengths\[2\] = -1, lengths\[4\] = 0"):
        DHPBatchSampler([3, 5, -1, 4, 0, 7], 2)
    with pytest.raises(DHPDataError, match=r"whole numbers; dataset items \[1\]"):
        DHPBatchSampler([3, 2.5], 2)


def test_loss_share_outside_dhp_says_what_is_wrong():
    with pytest.raises(DHPConfigError, match="not planned by DHPStrategy"):
        loss_share(torch.tensor(1.0), {"input_ids": torch.arange(3)})


def test_activation_checkpointing_keeps_parameter_names():
    from lightning_dhp.distributed.checkpointing import apply_activation_checkpointing

    model = TinyLM()
    names = list(model.state_dict())
    assert apply_activation_checkpointing(model, {Block}) == 1
    assert list(model.state_dict()) == names
    tokens = torch.arange(6) % 5
    F.cross_entropy(model(tokens, torch.arange(6)), tokens).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_profiled_cost_model_times_the_users_own_step():
    """cost_model="profile" fits the module's own forward+backward and trains with it (one process)."""
    from lightning_dhp.planner import CostModel

    strategy = DHPStrategy(TOKENS_PER_DEVICE[1], cost_model="profile")
    cpu_trainer(1, strategy, steps=1).fit(LMTask(), datamodule=_data())
    assert isinstance(strategy.planning_cost_model, CostModel)
    assert strategy.planning_cost_model != CostModel.default()


def test_an_undeclared_per_token_field_is_named_in_one_warning():
    from lightning_dhp.attention import ZigzagLayout

    items = [{"input_ids": torch.arange(n), "token_weights": torch.ones(n), "caption_ids": torch.arange(3)}
             for n in (5, 7)]
    layout = ZigzagLayout([5, 7], 1, 0)
    with pytest.warns(UserWarning, match=r"'token_weights' has one row per token.*token_fields=\['token_weights'\]"):
        batch = DHPPacking().collate_group(items, layout)
    assert isinstance(batch["token_weights"], list)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per field; a per-sample field of another length never warns
        DHPPacking().collate_group(items, layout)
        DHPPacking(token_fields=["token_weights"]).collate_group(items, layout)


def test_a_removed_strategy_attribute_names_its_replacement():
    strategy = DHPStrategy()
    with pytest.raises(AttributeError, match=r"plan_history was removed.*DHPPlanReport.*history"):
        strategy.plan_history  # noqa: B018
    assert not hasattr(strategy, "no_such_attribute")
