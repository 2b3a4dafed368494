"""Profiling the user's model: packs that identify every term, and fits of synthetic timings (a fake
clock driven by a known model) that recover its coefficients; a smoke run on this CPU."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lightning_dhp.lightning.module_profile import vision_items
from lightning_dhp.lightning.profiling import (
    fit_ring_steps,
    fit_vision_term,
    profile_cost_model,
    profile_packs,
    transformer_step,
)
from lightning_dhp.planner import CostModel

TRUE = CostModel(attention_s_per_token2=3e-9, linear_s_per_token=2e-5, overhead_s=4e-3, ring_step_latency_s=7e-4,
                 kv_bytes_per_token=65536.0, intra_node_bytes_per_s=80e9, inter_node_bytes_per_s=12e9,
                 comm_overlap=0.3)


class FakeCluster:
    """A clock advanced by TRUE's time for each pack and each ring step (nodes of 4 ranks)."""

    node_size = 4

    def __init__(self) -> None:
        self.now = 0.0
        self.ring_calls: list[tuple[int, int]] = []

    def clock(self) -> float:
        return self.now

    def run_pack(self, lengths) -> None:
        self.now += TRUE.group_time(lengths, 1)

    def ring_step(self, degree: int, tokens: int) -> None:
        self.ring_calls.append((degree, tokens))
        bandwidth = TRUE.inter_node_bytes_per_s if degree > self.node_size else TRUE.intra_node_bytes_per_s
        self.now += TRUE.ring_step_latency_s + TRUE.kv_bytes_per_token * tokens / bandwidth


def test_profiling_synthetic_timings_recovers_every_coefficient():
    cluster = FakeCluster()
    base = dataclasses.replace(CostModel.default(), kv_bytes_per_token=TRUE.kv_bytes_per_token, comm_overlap=0.3)
    model, report = profile_cost_model(
        cluster.run_pack, [256, 1024, 4096, 8192], ring_step=cluster.ring_step, ring_degrees=[2, 4, 8],
        ring_tokens=[512, 2048, 8192], node_size=cluster.node_size, base=base, timer=cluster.clock,
    )
    for field in dataclasses.fields(CostModel):
        assert getattr(model, field.name) == pytest.approx(getattr(TRUE, field.name), rel=1e-6), field.name
    assert report.compute.max_abs_pct_error < 1e-6 and report.ring.max_abs_pct_error < 1e-6
    assert report.ring.num_measurements == 9 and len(cluster.ring_calls) == 9 * (1 + 3)  # warmup + repeats
    assert [lengths for lengths, _, _ in report.packs] == profile_packs([256, 1024, 4096, 8192])
    assert "fit median 0.0%" in report.summary()


def test_profiling_whole_groups_fits_every_term_at_once():
    cluster = FakeCluster()

    def run_group(degree, lengths):
        cluster.now += TRUE.group_time(lengths, degree)

    base = dataclasses.replace(CostModel.default(), kv_bytes_per_token=TRUE.kv_bytes_per_token)
    model, report = profile_cost_model(cluster.run_pack, [300, 1200, 5000], run_group=run_group,
                                       group_degrees=[2, 3, 4], base=base, timer=cluster.clock)
    exposed = dataclasses.replace(TRUE, comm_overlap=0.0, ring_step_latency_s=TRUE.ring_step_latency_s * 0.7,
                                  intra_node_bytes_per_s=TRUE.intra_node_bytes_per_s / 0.7)  # 30% of the ring hidden
    for lengths, degree in (([4000], 3), ([100, 2500, 700], 4), ([900], 1)):
        assert model.group_time(lengths, degree) == pytest.approx(TRUE.group_time(lengths, degree), rel=1e-6)
        assert model.group_time(lengths, degree) == pytest.approx(exposed.group_time(lengths, degree), rel=1e-6)
    assert model.attention_s_per_token2 == pytest.approx(TRUE.attention_s_per_token2, rel=1e-6)
    assert report.ring is None and len(report.groups) == 3 * len(report.packs)
    assert report.compute.num_measurements == 4 * len(report.packs) and report.compute.max_abs_pct_error < 1e-6
    assert "groups of degree [2, 3, 4]" in report.summary()


def test_without_a_ring_step_the_ring_terms_stay_the_base_models():
    cluster = FakeCluster()
    model, report = profile_cost_model(cluster.run_pack, [100, 300, 900], base=TRUE, timer=cluster.clock)
    assert report.ring is None and report.ring_steps == []
    assert (model.ring_step_latency_s, model.intra_node_bytes_per_s) == (TRUE.ring_step_latency_s,
                                                                          TRUE.intra_node_bytes_per_s)
    assert "ring terms not profiled" in report.summary()


def test_ring_fit_without_cross_node_steps_keeps_the_inter_node_bandwidth():
    steps = [(2, tokens, 1e-3 + 65536.0 * tokens / 50e9) for tokens in (100, 1000, 10000)]
    model, report = fit_ring_steps(TRUE, steps, node_size=8)
    assert model.ring_step_latency_s == pytest.approx(1e-3) and model.intra_node_bytes_per_s == pytest.approx(50e9)
    assert model.inter_node_bytes_per_s == TRUE.inter_node_bytes_per_s and report.median_abs_pct_error < 1e-9


def test_whole_items_with_vision_patches_fit_the_vision_term():
    true = dataclasses.replace(TRUE, vision_s_per_patch=2.5e-6)
    items = {7: (40, 300), 9: (120, 1200), 11: (80, 0)}  # index: (tokens, patches)
    cluster = FakeCluster()

    def run_item(index: int) -> None:
        tokens, patches = items[index]
        cluster.now += true.group_time([tokens], 1, patches=[patches])

    chosen = vision_items([items.get(i, (5, 0))[0] for i in range(12)], [items.get(i, (5, 0))[1] for i in range(12)],
                          tokens_per_device=100)
    assert chosen == [7]  # patches and fits one device (item 9 has 120 tokens, item 11 none)
    fitted, timings = fit_vision_term(TRUE, run_item, [(index, *items[index]) for index in (7, 9)], timer=cluster.clock)
    assert fitted.vision_s_per_patch == pytest.approx(2.5e-6, rel=1e-9)
    assert dataclasses.replace(fitted, vision_s_per_patch=0.0) == TRUE and len(timings) == 2


def test_profile_packs_time_each_length_alone_split_in_two_and_next_to_its_neighbour():
    assert profile_packs([300, 100, 300]) == [[100], [300], [50, 50], [150, 150], [100, 300]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lengths": [5, 5]}, "at least 2 distinct sample lengths"),
        ({"lengths": [5, 9], "ring_step": lambda d, t: None, "ring_degrees": [1]}, "needs a degree >= 2"),
        ({"lengths": [5, 9], "run_group": lambda d, p: None, "group_degrees": [2], "ring_step": lambda d, t: None},
         "not both"),
        ({"lengths": [5, 9], "ring_step": lambda d, t: None, "ring_degrees": [2], "ring_tokens": [64]},
         "timings at 2 or more token counts"),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    cluster = FakeCluster()
    with pytest.raises(ValueError, match=message):
        profile_cost_model(cluster.run_pack, timer=cluster.clock, **kwargs)


def test_profiling_the_builtin_workload_on_this_cpu():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    model, report = profile_cost_model(transformer_step(hidden=16, heads=2, layers=1, device="cpu"), [16, 64],
                                       repeats=1)
    assert report.compute.num_measurements == 5
    assert all(math.isfinite(getattr(model, name)) for name in ("attention_s_per_token2", "linear_s_per_token"))


def test_auto_calibration_times_the_training_dtype_through_cp_attentions_kernel(monkeypatch):
    from lightning_dhp.lightning import profiling

    assert [profiling.compute_dtype(p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true", "64-true")] == [
        "bfloat16", "bfloat16", "float16", "float32", "float64"]
    seen = []

    def spy(q, k, v, layout):
        seen.append((q.dtype, layout.seq_lens))
        return torch.zeros_like(q)

    monkeypatch.setattr(profiling, "cp_attention", spy)
    profiling.transformer_step(hidden=16, heads=2, layers=1, device="cpu", dtype="bfloat16")([5, 3])
    assert seen == [(torch.bfloat16, (5, 3))]
