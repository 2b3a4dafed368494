"""Calibrate a CostModel by timing forward+backward work on degree-1 packs of samples.

One device cannot time a ring, so calibration measures degree-1 packs (attention + linear work +
per-step overhead) and fits ``a``, ``b`` and the overhead; the ring terms come from ``base`` (set
them from the interconnect, fit them from multi-device measurements with :meth:`CostModel.fit`, or
profile them with :func:`lightning_dhp.lightning.profiling.profile_cost_model`). ``run_step`` is
any callable (the user's model, or the built-in workload
:func:`lightning_dhp.lightning.profiling.transformer_step`); this module itself needs no torch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

from lightning_dhp.planner.cost_model import CostModel, FitReport

DEFAULT_PACKS: tuple[tuple[int, ...], ...] = (
    (256,),
    (512,),
    (1024,),
    (2048,),
    (4096,),
    (256, 256, 256, 256),
    (1024, 1024),
    (512, 1536),
    (2048, 1024, 512),
    (128,) * 16,
)


def calibrate(
    run_step: Callable[[Sequence[int]], None],
    packs: Sequence[Sequence[int]] = DEFAULT_PACKS,
    *,
    repeats: int = 3,
    warmup: int = 1,
    base: CostModel | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> tuple[CostModel, FitReport, list[tuple[list[int], int, float]]]:
    """Time ``run_step`` on every pack (median of ``repeats`` after ``warmup``) and fit a model.

    Returns the fitted model, its fit error and the raw ``(lengths, 1, seconds)`` measurements.
    ``run_step`` must finish its device work before returning (synchronise).
    """
    if len(packs) < 3:
        raise ValueError(f"calibrate needs at least 3 packs of lengths, got {len(packs)}")
    measurements = []
    for pack in packs:
        lengths = [int(length) for length in pack]
        for _ in range(warmup):
            run_step(lengths)
        seconds = []
        for _ in range(repeats):
            start = timer()
            run_step(lengths)
            seconds.append(timer() - start)
        measurements.append((lengths, 1, statistics.median(seconds)))
    model, report = CostModel.fit(measurements, base=base)
    return model, report, measurements
