"""Binding the world process group to the process's device."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_dhp.distributed.world import subgroups_split_from_world, world_device_id


def test_accelerators_bind_the_world_and_cpu_does_not():
    assert world_device_id(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert world_device_id(torch.device("cpu")) is None


def test_split_check_needs_an_initialised_world():
    with pytest.raises(RuntimeError, match="not initialised"):
        subgroups_split_from_world()


def test_a_gloo_world_is_not_bound(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert subgroups_split_from_world() is False
    finally:
        dist.destroy_process_group()
