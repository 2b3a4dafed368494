"""Calibration: timing packs and fitting (a fake clock makes the fit exactly checkable), and a
smoke run of the built-in transformer workload on this CPU."""

from __future__ import annotations

import math

import pytest

from lightning_dhp.planner import CostModel
from lightning_dhp.planner.calibration import calibrate

TRUE = CostModel(attention_s_per_token2=4e-9, linear_s_per_token=3e-6, overhead_s=2e-3)


class FakeDevice:
    """A clock that advances by the TRUE model's time for every step it runs."""

    def __init__(self) -> None:
        self.now = 0.0
        self.steps: list[list[int]] = []

    def clock(self) -> float:
        return self.now

    def run_step(self, lengths) -> None:
        self.steps.append(list(lengths))
        self.now += TRUE.group_time(lengths, 1)


def test_calibrate_times_every_pack_and_recovers_the_device_model():
    device = FakeDevice()
    packs = [(128,), (1024,), (4096,), (512, 512), (64,) * 8]
    model, report, measurements = calibrate(
        device.run_step, packs, repeats=2, warmup=1, base=CostModel.default(), timer=device.clock
    )
    assert len(device.steps) == len(packs) * 3  # warmup + repeats
    assert [lengths for lengths, _, _ in measurements] == [list(pack) for pack in packs]
    assert report.num_measurements == 5 and report.max_abs_pct_error < 1e-6
    for lengths in ([3000], [100, 200, 300]):
        assert model.group_time(lengths, 1) == pytest.approx(TRUE.group_time(lengths, 1), rel=1e-6)
    assert model.ring_step_latency_s == CostModel.default().ring_step_latency_s  # ring terms from base


def test_calibrate_needs_three_packs():
    with pytest.raises(ValueError, match="at least 3 packs of lengths, got 2"):
        calibrate(lambda lengths: None, [(1,), (2,)])


def test_builtin_transformer_workload_runs_and_fits_on_cpu():
    torch = pytest.importorskip("torch")
    from lightning_dhp.lightning.profiling import transformer_step

    torch.set_num_threads(1)
    step = transformer_step(hidden=16, heads=2, layers=1, device="cpu")
    model, report, measurements = calibrate(step, [(16,), (64,), (32, 32), (128,)], repeats=1, warmup=1)
    assert len(measurements) == 4 and all(seconds > 0 for _, _, seconds in measurements)
    assert all(math.isfinite(getattr(model, name)) for name in ("attention_s_per_token2", "linear_s_per_token"))
    assert math.isfinite(report.median_abs_pct_error)
