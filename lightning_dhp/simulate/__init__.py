"""Cluster-scale simulator: replay a length distribution through DHP and static CP on 8..1024 devices.

Every simulated step draws one global batch (``samples_per_device x devices`` samples; batches are
consecutive slices of seeded shuffles of the whole distribution, so each pass sees every sample once)
and plans it under one cost model with:

- ``dhp``: :func:`~lightning_dhp.planner.plan_batch` (node-aware, any degree);
- ``dhp-paper``: the DHP paper's algorithm as published, :func:`~lightning_dhp.simulate.peers.paper_plan`
  (best-fit-decreasing bins, the ``O(K' N^2)`` min-max DP, round-robin leftover devices; rounds split
  as DHP splits them);
- ``megatron-dcp``: Megatron-Core's dynamic (hybrid) CP, :func:`~lightning_dhp.simulate.peers.megatron_dcp_plan`
  (a power-of-two CP size per sample on pre-created aligned groups, its greedy balancing), its
  groups timed running their samples one after another as Megatron does;
- ``ring-<d>``: :func:`~lightning_dhp.planner.static_plan` at every power-of-two degree ``d`` that
  divides the devices and fits the longest sample of the whole distribution (Megatron-style ring CP,
  one degree for the whole run, DP = devices / d); groups wider than a node pay the inter-node
  bandwidth;
- ``ulysses-<d>``: the same groups as ``ring-<d>`` for every such ``d`` that also divides the
  attention heads, timed with an all-to-all model built from the cost model's fields (see
  :func:`~lightning_dhp.simulate.policies.ulysses_group_time`);
- ``dhp-vision-blind`` (sources with vision patches, e.g. ``activitynet+mooncake``): ``plan_batch``
  without the patches, timed with them, i.e. what DHP loses by ignoring the vision tower. Every other
  policy plans and is timed with the patches.

``--vision-patches-per-device`` budgets the vision tower's memory as ``--tokens-per-device`` budgets the
language model's: every policy but ``dhp-vision-blind`` (which does not see the patches, so may break
it) keeps each group's patches within its degree x that budget.

"Best static" is the static policy with the lowest predicted time over all simulated steps (chosen
with hindsight); "Megatron static" is ``ring-<d>`` at the smallest fitting degree (Megatron's default).
Useful work is the cost model's degree-1 compute of every sample (``a L^2 + b L + vision V``, no
padding, no communication, no overhead); utilisation is useful work over devices x step time.

Modules: ``sources`` (where the lengths come from), ``policies`` and ``peers`` (what is simulated and
how it is timed), ``config`` (the run's settings and the paper's presets), ``replay`` (the loop),
``results`` (typed results, their JSON), ``report`` (the markdown), ``cli`` (the command line),
``provenance`` (machine, commit and date, shared with the benchmarks).

Run ``python -m lightning_dhp.simulate --help``.
"""

from lightning_dhp.simulate.cli import build_parser, main, run, write_outputs
from lightning_dhp.simulate.config import PRESETS, Preset, SimulationConfig, SimulationError
from lightning_dhp.simulate.policies import (
    PEERS,
    VISION_BLIND,
    fitting_static_degrees,
    megatron_group_time,
    retimed,
    ring_group_time,
    ulysses_group_time,
)
from lightning_dhp.simulate.provenance import machine_description
from lightning_dhp.simulate.replay import simulate, simulate_device_count
from lightning_dhp.simulate.report import format_markdown
from lightning_dhp.simulate.results import DeviceCountResult, DistributionResult, SimulationResult
from lightning_dhp.simulate.sources import (
    MULTIMODAL_DISTRIBUTIONS,
    PATCHES_PER_VISUAL_TOKEN,
    LengthSource,
    csv_source,
    multimodal_source,
    named_source,
)

__all__ = [
    "MULTIMODAL_DISTRIBUTIONS",
    "PATCHES_PER_VISUAL_TOKEN",
    "PEERS",
    "PRESETS",
    "VISION_BLIND",
    "DeviceCountResult",
    "DistributionResult",
    "LengthSource",
    "Preset",
    "SimulationConfig",
    "SimulationError",
    "SimulationResult",
    "build_parser",
    "csv_source",
    "fitting_static_degrees",
    "format_markdown",
    "machine_description",
    "main",
    "megatron_group_time",
    "multimodal_source",
    "named_source",
    "retimed",
    "ring_group_time",
    "run",
    "simulate",
    "simulate_device_count",
    "ulysses_group_time",
    "write_outputs",
]
