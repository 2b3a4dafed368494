import os

import pytest
import torch
import torch.distributed as dist

from lightning_dhp.testing import run_distributed
from tests.helpers import assert_parameters_match


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


def _leave_state_behind(rank, world_size):
    state = {"variable": os.environ.get("DHP_TEST_LEFT_BEHIND"), "folder": os.getcwd(),
             "dtype": torch.get_default_dtype(), "caller": os.environ.get("DHP_TEST_CALLER_VARIABLE")}
    os.environ["DHP_TEST_LEFT_BEHIND"] = "yes"
    torch.set_default_dtype(torch.float64)
    os.chdir("/")
    return state


def test_kept_ranks_run_each_world_in_the_callers_environment_and_restore_their_own(tmp_path, monkeypatch):
    # (whether the second world runs on the first's processes is not asserted: under two pytest-xdist workers a kept
    # rank's next gloo group has failed to connect, and the world then ran again on fresh ranks)
    monkeypatch.chdir(tmp_path)
    first = run_distributed(_leave_state_behind, 2)
    monkeypatch.setenv("DHP_TEST_CALLER_VARIABLE", "seen")
    second = run_distributed(_leave_state_behind, 2)
    for state in first + second:
        assert state["variable"] is None and state["dtype"] == torch.float32 and state["folder"] == str(tmp_path)
    assert [state["caller"] for state in first + second] == [None, None, "seen", "seen"]


def test_run_distributed_returns_results_by_rank():
    assert run_distributed(_sum_ranks, 3) == [3.0, 3.0, 3.0]


def test_run_distributed_turns_a_hang_into_a_timeout():
    with pytest.raises((TimeoutError, RuntimeError)):
        run_distributed(_hang_on_rank_zero, 2, timeout_s=8)


def test_run_distributed_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="rank one says no"):
        run_distributed(_fail_on_rank_one, 2)


def test_parameters_match_within_float64_rounding_and_a_mismatch_names_the_worst_parameter():
    reference = {"a": torch.ones(3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    assert_parameters_match({name: value + 1e-13 for name, value in reference.items()}, reference)
    off = {"a": reference["a"] + 1e-6, "b": reference["b"] + torch.tensor([0.0, 1e-3], dtype=torch.float64)}
    with pytest.raises(AssertionError, match=r"2 of 2 parameters differ.*worst: b \(max abs error 0\.001\)"):
        assert_parameters_match(off, reference)
    with pytest.raises(AssertionError, match=r"missing parameters \['b'\]"):
        assert_parameters_match({"a": reference["a"]}, reference)
    with pytest.raises(AssertionError, match=r"parameter a: torch\.float32"):
        assert_parameters_match({"a": reference["a"].float(), "b": reference["b"]}, reference)
    with pytest.raises(AssertionError, match="worst: a"):
        assert_parameters_match({"a": reference["a"] * float("nan"), "b": reference["b"]}, reference)
