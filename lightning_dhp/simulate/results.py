"""Typed simulation results; :meth:`SimulationResult.to_json` is what ``--json`` writes.

Per-policy figures stay mappings keyed by policy name (``"dhp"``, ``"ring-8"``, ...): the policies
simulated depend on the distribution and the device count.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lightning_dhp.planner import CostModel
    from lightning_dhp.simulate.config import Preset, SimulationConfig


@dataclass(frozen=True)
class LengthStats:
    """Spread of a source's token lengths; ``with_vision``: the share of samples with vision patches (None:
    a text-only source)."""

    samples: float
    median: float
    mean: float
    p99: float
    max: float
    cv: float
    with_vision: float | None = None

    def to_json(self) -> dict[str, float]:
        return _without_none(dataclasses.asdict(self), "with_vision")


@dataclass(frozen=True)
class Spread:
    """Median, p10, p90, min and max of per-step values."""

    median: float
    p10: float
    p90: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(
            median=statistics.median(values),
            p10=float(np.percentile(values, 10)),
            p90=float(np.percentile(values, 90)),
            min=min(values),
            max=max(values),
        )


@dataclass(frozen=True)
class PlannerTime:
    """DHP's planner wall time per batch, in milliseconds."""

    median: float
    p90: float


@dataclass(frozen=True)
class PoolReplay:
    """The strategy's group pool replayed over DHP's plans: groups created and evicted under the
    capacity, distinct rank sets (what an uncapped pool creates) and the hit rates with and without the cap."""

    capacity: float
    created: float
    evicted: float
    distinct_rank_sets: float
    hit_rate: float
    hit_rate_uncapped: float


@dataclass(frozen=True)
class Scaling:
    """Per-device throughput over that at the smallest simulated device count."""

    dhp: float
    best_static: float


@dataclass(frozen=True)
class DeviceCountResult:
    """Every policy on the same steps at one device count. ``speedup_over*``: the other policy's time over
    DHP's (> 1: DHP faster); ``best_static``: the static policy fastest in hindsight; ``megatron``: the
    smallest fitting ring degree; ``scaling_efficiency``: None until compared with the smallest device count
    (:func:`~lightning_dhp.simulate.replay.simulate` does)."""

    devices: int
    global_batch: int
    steps: int
    epochs: float
    step_time_s: dict[str, float]
    lower_bound_s: float
    dhp_rounds: float
    best_static: str
    megatron: str
    speedup_over_best_static: float
    speedup_over_megatron: float
    speedup_over: dict[str, float]
    utilisation: dict[str, float]  # "dhp" and the best static policy
    tokens_per_device_s: dict[str, float]  # "dhp" and the best static policy
    planner_ms: PlannerTime
    peer_planner_ms_median: dict[str, float]
    pool: PoolReplay
    vision_blind_over_aware: Spread | None = None  # sources with vision patches only
    scaling_efficiency: Scaling | None = None

    def to_json(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self), "vision_blind_over_aware", "scaling_efficiency")


@dataclass(frozen=True)
class DistributionResult:
    """One source at every simulated device count."""

    name: str
    rule: str
    stats: LengthStats
    results: list[DeviceCountResult]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "stats": self.stats.to_json(),
                "results": [row.to_json() for row in self.results]}


@dataclass(frozen=True)
class SimulationResult:
    """A whole run: its settings, where and when it ran, and every source's results."""

    config: SimulationConfig
    cost_model: CostModel
    machine: str
    date: str
    distributions: list[DistributionResult]
    preset: Preset | None = None

    def to_json(self) -> dict[str, Any]:
        result = {
            "config": dataclasses.asdict(self.config),
            "cost_model": dataclasses.asdict(self.cost_model),
            "machine": self.machine,
            "date": self.date,
            "distributions": [distribution.to_json() for distribution in self.distributions],
        }
        if self.preset is not None:
            result["preset"] = dataclasses.asdict(self.preset)
        return result


def _without_none(fields: dict[str, Any], *optional: str) -> dict[str, Any]:
    """``fields`` less the ``optional`` keys whose value is None (the JSON leaves them out)."""
    return {key: value for key, value in fields.items() if not (key in optional and value is None)}
