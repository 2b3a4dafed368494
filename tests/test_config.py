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
from lightning_dhp.planner import CostModel
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
