"""CostModel: the formula, its vectorised forms, fitting from measurements, JSON persistence."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest

from lightning_dhp.planner import CostModel, padded_length

MODEL = CostModel(
    attention_s_per_token2=3e-9,
    linear_s_per_token=2e-5,
    overhead_s=1e-3,
    ring_step_latency_s=4e-4,
    kv_bytes_per_token=1000.0,
    intra_node_bytes_per_s=1e8,
    inter_node_bytes_per_s=2e7,
    comm_overlap=0.25,
)


def reference_time(lengths: list[int], degree: int, crosses_node: bool) -> float:
    padded = [padded_length(length, degree) for length in lengths]
    compute = (3e-9 * sum(p * p for p in padded) + 2e-5 * sum(padded)) / degree
    bandwidth = 2e7 if crosses_node else 1e8
    ring = 0.0 if degree == 1 else (degree - 1) * 0.75 * (4e-4 + 1000.0 * sum(padded) / degree / bandwidth)
    return 1e-3 + compute + ring


def test_padding_rule():
    assert [padded_length(7, 1), padded_length(7, 2), padded_length(8, 2), padded_length(13, 3)] == [7, 8, 8, 18]


@pytest.mark.parametrize("degree", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("crosses_node", [False, True])
def test_group_time_matches_the_documented_formula(degree, crosses_node):
    lengths = [1, 17, 300, 4097]
    assert MODEL.group_time(lengths, degree, crosses_node=crosses_node) == pytest.approx(
        reference_time(lengths, degree, crosses_node), rel=1e-12
    )


def test_vectorised_forms_agree_with_group_time():
    lengths = np.array([5, 99, 1000, 2345])
    degrees = np.arange(1, 13)
    over_degrees = MODEL.times_over_degrees(lengths, degrees, node_size=4)
    expected = [MODEL.group_time(lengths.tolist(), int(d), crosses_node=bool(d > 4)) for d in degrees]
    np.testing.assert_allclose(over_degrees, expected, rtol=1e-12)
    for degree in (1, 3, 6):
        shares = MODEL.sample_costs(lengths, degree)
        assert MODEL.fixed_time(degree) + math.fsum(shares) == pytest.approx(
            MODEL.group_time(lengths.tolist(), degree), rel=1e-12
        )


def synthetic_measurements(model: CostModel, degrees: list[int], noise: float, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for degree in degrees:
        for _ in range(12):
            lengths = rng.integers(64, 8192, size=int(rng.integers(1, 5))).tolist()
            seconds = model.group_time(lengths, degree) * (1 + noise * rng.standard_normal())
            rows.append((lengths, degree, seconds))
    return rows


def test_fit_recovers_coefficients_and_reports_its_error():
    fitted, report = CostModel.fit(synthetic_measurements(MODEL, [1, 2, 3, 4, 6, 8], 0.0, 0), base=MODEL)
    for lengths, degree in [([4000], 1), ([100, 7000], 4), ([3000, 3000], 7)]:
        assert fitted.group_time(lengths, degree) == pytest.approx(MODEL.group_time(lengths, degree), rel=1e-6)
    assert fitted.comm_overlap == 0.0  # ring terms are fitted as exposed time
    assert report.num_measurements == 72 and report.max_abs_pct_error < 1e-6

    noisy, noisy_report = CostModel.fit(synthetic_measurements(MODEL, [1, 2, 4], 0.05, 1), base=MODEL)
    assert 1.0 < noisy_report.median_abs_pct_error < 8.0
    assert noisy.group_time([6000], 2) == pytest.approx(MODEL.group_time([6000], 2), rel=0.05)
    assert noisy_report.median_abs_pct_error <= noisy_report.p90_abs_pct_error <= noisy_report.max_abs_pct_error


def test_fit_from_single_device_measurements_keeps_the_ring_terms():
    fitted, _ = CostModel.fit(synthetic_measurements(MODEL, [1], 0.0, 2), base=MODEL)
    assert fitted.linear_s_per_token == pytest.approx(MODEL.linear_s_per_token, rel=1e-6)
    assert (fitted.ring_step_latency_s, fitted.comm_overlap) == (MODEL.ring_step_latency_s, MODEL.comm_overlap)


VISION = dataclasses.replace(MODEL, vision_s_per_patch=4e-6)


@pytest.mark.parametrize("degree", [1, 3, 8])
def test_vision_patches_add_their_seconds_split_over_the_group(degree):
    lengths, patches = [1, 17, 300, 4097], [0, 1000, 0, 25000]
    expected = reference_time(lengths, degree, False) + 4e-6 * 26000 / degree
    assert VISION.group_time(lengths, degree, patches=patches) == pytest.approx(expected, rel=1e-12)
    assert VISION.group_time(lengths, degree, patches=[0] * 4) == VISION.group_time(lengths, degree)
    shares = VISION.sample_costs(np.array(lengths), degree, patches=np.array(patches))
    assert VISION.fixed_time(degree) + math.fsum(shares) == pytest.approx(expected, rel=1e-12)
    over_degrees = VISION.times_over_degrees(np.array(lengths), np.array([degree, 2 * degree]), node_size=4,
                                             patches=np.array(patches))
    expected_over = [VISION.group_time(lengths, d, crosses_node=d > 4, patches=patches) for d in (degree, 2 * degree)]
    np.testing.assert_allclose(over_degrees, expected_over, rtol=1e-12)


def synthetic_vision_measurements(model: CostModel, seed: int):
    """Groups of degrees 1-4, half of their samples videos with 4 patches per token."""
    rng = np.random.default_rng(seed)
    rows = []
    for degree in (1, 2, 3, 4):
        for _ in range(12):
            lengths = rng.integers(64, 8192, size=int(rng.integers(1, 5)))
            patches = np.where(rng.random(len(lengths)) < 0.5, 4 * lengths, 0)
            seconds = model.group_time(lengths.tolist(), degree, patches=patches.tolist())
            rows.append((lengths.tolist(), degree, seconds, patches.tolist()))
    return rows


def test_fit_recovers_the_seconds_per_vision_patch():
    fitted, report = CostModel.fit(synthetic_vision_measurements(VISION, 4), base=MODEL)
    assert fitted.vision_s_per_patch == pytest.approx(4e-6, rel=1e-6)
    assert fitted.linear_s_per_token == pytest.approx(VISION.linear_s_per_token, rel=1e-6)
    assert report.max_abs_pct_error < 1e-6
    # three-item measurements (no patches) cannot identify it: the base's value stays
    text_only = [(lengths, degree, VISION.group_time(lengths, degree)) for lengths, degree, _, _ in
                 synthetic_vision_measurements(VISION, 5)]
    kept, _ = CostModel.fit(text_only, base=VISION)
    assert kept.vision_s_per_patch == VISION.vision_s_per_patch
    with pytest.raises(ValueError, match="a measurement has 2 lengths but 1 patch counts"):
        CostModel.fit([([10, 20], 1, 0.1, [5]), ([20], 1, 0.2), ([30], 1, 0.3)])
    with pytest.raises(ValueError, match=r"a measurement is \(lengths, degree, seconds\) or .* got 2 items"):
        CostModel.fit([([10], 1), ([20], 1, 0.2), ([30], 1, 0.3)])


def test_fit_rejects_too_few_or_bad_measurements():
    with pytest.raises(ValueError, match="at least 3 measurements, got 2"):
        CostModel.fit([([10], 1, 0.1), ([20], 1, 0.2)])
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        CostModel.fit([([10], 1, 0.1), ([20], 1, 0.2), ([30], 1, -1.0)])


def test_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "cost.json"
    MODEL.save(path)
    assert CostModel.load(path) == MODEL
    assert CostModel.from_json(MODEL.to_json()) == MODEL
    assert CostModel.from_json(VISION.to_json()) == VISION
    # a file written before the vision tower was modelled
    older = {key: value for key, value in dataclasses.asdict(MODEL).items() if key != "vision_s_per_patch"}
    assert CostModel.from_json(json.dumps(older)) == MODEL and MODEL.vision_s_per_patch == 0.0
    with pytest.raises(ValueError, match=r"unknown CostModel field\(s\) \['flops'\]"):
        CostModel.from_json('{"flops": 1.0}')
    with pytest.raises(ValueError, match=re.escape("CostModel.overhead_s=-1.0 must be a finite number >= 0")):
        dataclasses.replace(MODEL, overhead_s=-1.0)
    with pytest.raises(ValueError, match=r"comm_overlap=1.5 must lie in \[0, 1\]"):
        dataclasses.replace(MODEL, comm_overlap=1.5)
