"""DHPConfig: the strategy's options, checked once; DHPStrategy(**options) and DHPStrategy(config=...) agree.

Fast: no process group, no Trainer.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from torch import nn

from lightning_dhp import DHPConfig, DHPStrategy
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.planner import CostModel, PlannerOptions, plan_batch
from tests.tiny_lm import Block


@pytest.mark.parametrize(("options", "fragment"), [
    ({"tokens_per_device": 0}, "tokens_per_device must be >= 1, got 0"),
    ({"cp_implementation": "mesh"}, "cp_implementation must be one of"),
    ({"group_free_ring": True, "cp_implementation": "allgather"}, "group_free_ring=True needs cp_implementation"),
    ({"start_method": "thread"}, "start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got 'thread'"),
    ({"static_degree": 0}, "static_degree must be >= 1, got 0"),
    ({"sharding": "zero3"}, "sharding must be one of"),
    ({"fsdp_modules": [Block]}, "fsdp_modules needs sharding='fsdp'"),
    ({"save_distributed_checkpoint": True}, "save_distributed_checkpoint needs sharding='fsdp'"),
    ({"vision_patches_per_device": True}, "vision_patches_per_device must be a whole number >= 1 or None"),
    ({"data_wait_timeout": -1.0}, "data_wait_timeout must be a positive number of seconds"),
    ({"activation_checkpointing": "tests.tiny_lm.NoSuchBlock"}, "cannot import the module class"),
    ({"activation_checkpointing": "NoModulePath"}, "cannot import the module class 'NoModulePath'"),
    ({"planner_options": {"rebalanc": False}}, "planner_options: PlannerOptions has no option 'rebalanc'; did you mean "
                                               "rebalance"),
    ({"planner_options": {"prune_margin": -0.1}}, r"PlannerOptions.prune_margin must be a number >= 0 \(inf allowed\), "
                                                  "got -0.1"),
    ({"planner_options": {"refine_passes": 2.5}}, "PlannerOptions.refine_passes must be a whole number >= 0"),
    ({"planner_options": {"rebalance": "no"}}, "PlannerOptions.rebalance must be True or False, got 'no'"),
    ({"planner_options": "light"}, "planner_options must be a PlannerOptions, a mapping of its fields or None, "
                                   "got str"),
    ({"planner_options": {"rebalance": False}, "static_degree": 2}, "planner_options tune the DHP planner, which "
                                                                     "static_degree does not use"),
])
def test_an_option_that_cannot_work_is_the_same_error_from_the_config_and_the_strategy(options, fragment):
    with pytest.raises(DHPConfigError, match=fragment) as from_config:
        DHPConfig(**options)
    with pytest.raises(DHPConfigError, match=fragment) as from_strategy:
        DHPStrategy(**options)
    assert str(from_config.value) == str(from_strategy.value)


def test_module_classes_given_as_import_paths_are_resolved_to_classes_in_the_config():
    config = DHPConfig(activation_checkpointing="tests.tiny_lm.Block")
    assert config.activation_checkpointing == (Block,)
    assert DHPConfig(activation_checkpointing=[Block, "torch.nn.Linear"]).activation_checkpointing == (Block, nn.Linear)
    assert DHPConfig().activation_checkpointing == () and DHPConfig().fsdp_modules == ()


def test_the_config_is_frozen_and_replace_checks_again():
    config = DHPConfig(tokens_per_device=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tokens_per_device = 8  # type: ignore[misc]
    assert dataclasses.replace(config, static_degree=2).static_degree == 2
    with pytest.raises(DHPConfigError, match="static_degree must be >= 1"):
        dataclasses.replace(config, static_degree=0)


def test_only_the_first_four_options_are_positional_as_in_the_strategy():
    assert DHPConfig(64, "auto", 8, "spawn") == DHPConfig(tokens_per_device=64, cost_model="auto", pool_size=8,
                                                          start_method="spawn")
    with pytest.raises(TypeError):
        DHPConfig(64, None, 32, "popen", "ring")  # type: ignore[misc]
    with pytest.raises(TypeError):
        DHPStrategy(64, None, 32, "popen", "ring")


def test_options_one_by_one_and_a_config_build_the_same_strategy():
    cost_model = CostModel.default()
    options = {"tokens_per_device": 48, "cost_model": cost_model, "pool_size": 4, "cp_implementation": "allgather",
               "static_degree": 2, "skip_bad_samples": True, "activation_checkpointing": "tests.tiny_lm.Block",
               "gradient_bucket_mb": None, "data_wait_timeout": 30.0}
    by_options, by_config = DHPStrategy(**options), DHPStrategy(config=DHPConfig(**options))
    assert by_options.config == by_config.config == DHPConfig(**options)
    assert DHPStrategy(48, cost_model, 4).config == DHPConfig(48, cost_model, 4)
    assert DHPStrategy().config == DHPConfig()
    # options read as attributes come from the config; the cost model stays as given until setup resolves it
    assert by_config.tokens_per_device == 48 and by_config.static_degree == 2
    assert by_config.cost_model is cost_model and by_config.planning_cost_model is None
    assert by_options.pool.capacity == by_config.pool.capacity == 4


@pytest.mark.parametrize("extra", [{"tokens_per_device": 8}, {"pool_size": 32}])
def test_a_config_and_options_together_are_refused(extra):
    with pytest.raises(DHPConfigError, match=r"either as config=DHPConfig\(\.\.\.\) or one by one.*tokens_per_device"
                       if "tokens_per_device" in extra else "either as config=DHPConfig"):
        DHPStrategy(config=DHPConfig(), **extra)
    with pytest.raises(DHPConfigError, match="either as config=DHPConfig"):
        DHPStrategy(16, config=DHPConfig())


def test_the_strategys_own_arguments_stay_with_the_strategy_and_are_checked_against_the_config():
    config = DHPConfig(data_wait_timeout=600.0)
    with pytest.raises(DHPConfigError, match="not below the collective timeout"):
        DHPStrategy(config=config, timeout=timedelta(seconds=300))
    strategy = DHPStrategy(config=config, timeout=timedelta(seconds=900), process_group_backend="gloo")
    assert strategy.process_group_backend == "gloo"
    with pytest.raises(TypeError):
        DHPStrategy(no_such_option=1)


def test_a_static_degree_must_divide_the_world_it_runs_on_and_the_error_names_the_divisors():
    DHPConfig(static_degree=3).check_static_degree(6)
    DHPConfig().check_static_degree(5)  # DHP takes any world size
    with pytest.raises(DHPConfigError, match=r"static_degree=3 does not divide the 4 devices; use one of \[1, 2, 4\]"):
        DHPConfig(static_degree=3).check_static_degree(4)


def test_the_registered_names_build_the_strategy_from_options():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry.get("dhp").config == DHPConfig()
    assert StrategyRegistry.get("dhp_spawn").config == DHPConfig(start_method="spawn")


def test_the_planning_cost_model_is_resolved_from_what_was_passed_and_the_config_keeps_it(tmp_path):
    from lightning_dhp.lightning.planning_model import resolve_at_setup

    model = dataclasses.replace(CostModel.default(), linear_s_per_token=3e-9)
    model.save(tmp_path / "model.json")
    assert resolve_at_setup(None, None) is None  # the planner's default
    assert resolve_at_setup(model, None) is model
    assert resolve_at_setup("profile", None) is None  # until the first loader's data is timed
    assert resolve_at_setup(str(tmp_path / "model.json"), None) == model
    config = DHPConfig(cost_model=str(tmp_path / "model.json"))
    assert config.cost_model == str(tmp_path / "model.json")


LIGHT_PLANNING = {"rebalance": False, "static_rounds_extra": 0}
LENGTHS = [51, 38, 31, 16, 19, 3, 5, 1, 11, 48, 39, 54]  # three rounds on 4 devices at 32 tokens each


def test_planner_options_from_a_config_mapping_reach_the_loaders_plans():
    """Hydra passes ``strategy.planner_options`` as a mapping; the loader plans with exactly those options."""
    import torch
    from lightning.pytorch.plugins.environments import LightningEnvironment

    from lightning_dhp.lightning import dhp_dataloader
    from lightning_dhp.lightning.planned_loader import StepRequest

    assert DHPConfig(planner_options={"extra_start_degrees": [1, 2]}).planner_options == PlannerOptions(
        extra_start_degrees=(1, 2))
    light = PlannerOptions(**LIGHT_PLANNING)
    four_ranks = LightningEnvironment()
    four_ranks.set_world_size(4)
    strategy = DHPStrategy(tokens_per_device=32, planner_options=LIGHT_PLANNING, cluster_environment=four_ranks,
                           parallel_devices=[torch.device("cpu")] * 4)
    assert strategy.config.planner_options == light

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(LENGTHS)

        def __getitem__(self, index: int) -> dict:
            return {"input_ids": torch.zeros(LENGTHS[index], dtype=torch.long)}

    loader = strategy.process_dataloader(dhp_dataloader(Tokens(), LENGTHS, len(LENGTHS)))
    assert loader.plan_config.planner_options == light
    planned = loader.dataset[StepRequest("x", 0, 0, tuple(range(len(LENGTHS))))].plan
    assert planned.digest() == plan_batch(LENGTHS, 4, 32, options=light).digest()
    assert planned.digest() != plan_batch(LENGTHS, 4, 32).digest()  # these options change this batch's plan
