import pytest
import torch
import torch.distributed as dist

from lightning_dhp.testing import run_distributed


def _sum_ranks(rank, world_size):
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return value.item()


def _hang_on_rank_zero(rank, world_size):
    if rank == 0:
        dist.barrier()  # rank 1 never joins


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one says no")


def test_run_distributed_returns_results_by_rank():
    assert run_distributed(_sum_ranks, 3) == [3.0, 3.0, 3.0]


def test_run_distributed_turns_a_hang_into_a_timeout():
    with pytest.raises((TimeoutError, RuntimeError)):
        run_distributed(_hang_on_rank_zero, 2, timeout_s=8)


def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="rank one says no"):
        run_distributed(_fail_on_rank_one, 2)
