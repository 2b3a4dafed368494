"""The cluster-scale simulator: its CLI output and files, its error paths, and its timing invariants."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dhp.data import token_lengths
from lightning_dhp.planner import CostModel, plan_batch, static_plan
from lightning_dhp.planner.presets import MODEL_PRESETS, VISION_PRESETS
from lightning_dhp.simulate import (
    PATCHES_PER_VISUAL_TOKEN,
    PRESETS,
    LengthSource,
    SimulationConfig,
    csv_source,
    main,
    multimodal_source,
    retimed,
    ring_group_time,
    simulate_device_count,
    ulysses_group_time,
)
from lightning_dhp.simulate.provenance import stamp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_dhp.simulate", *args], capture_output=True, text=True, timeout=120
    )


def test_quick_run_prints_the_report_and_writes_markdown_and_json(tmp_path):
    out, json_path = tmp_path / "out", tmp_path / "result.json"
    completed = run_cli("--quick", "--devices", "8,16", "--out", str(out), "--json", str(json_path))
    assert completed.returncode == 0, completed.stderr
    report = completed.stdout
    assert report.startswith("# DHP cluster-scale simulation")
    assert "## Targets" not in report  # the project's targets belong to the benchmark report
    assert "## epic_kitchens_segments" in report and "Rule: EPIC-KITCHENS-100" in report
    assert ("| devices | batch | DHP s/step | best static s/step | DHP / best static | DHP / Megatron static | "
            "DHP / dhp-paper | DHP / megatron-dcp |") in report
    assert (out / "simulation.md").read_text() == report
    assert sorted(path.name for path in out.iterdir()) == ["simulation.md"]

    result = json.loads(json_path.read_text())
    rows = result["distributions"][0]["results"]
    assert [row["devices"] for row in rows] == [8, 16]
    for row in rows:
        times = row["step_time_s"]
        statics = {policy: seconds for policy, seconds in times.items() if policy.startswith(("ring-", "ulysses-"))}
        assert row["best_static"] == min(statics, key=statics.get)
        assert row["speedup_over_best_static"] == pytest.approx(statics[row["best_static"]] / times["dhp"])
        assert row["megatron"] == min((p for p in statics if p.startswith("ring-")), key=lambda p: int(p[5:]))
        for peer in ("dhp-paper", "megatron-dcp"):
            assert row["speedup_over"][peer] == pytest.approx(times[peer] / times["dhp"])
            assert row["peer_planner_ms_median"][peer] > 0
        assert 0 < row["utilisation"]["dhp"] <= 1
        assert row["pool"]["distinct_rank_sets"] <= row["pool"]["created"]
        assert f"| {row['devices']} | {row['global_batch']} | {times['dhp']:.3f} |" in report
    assert rows[0]["scaling_efficiency"] == {"dhp": 1.0, "best_static": 1.0}


def test_the_benchmark_report_adds_the_targets_and_the_plots(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "simulation_report.py"), "--quick", "--devices", "8,64",
         "--steps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr
    assert "## Targets" in completed.stdout
    assert "- DHP over best static at 64 devices on epic_kitchens_segments" in completed.stdout
    assert "- DHP over dhp-paper there: " in completed.stdout
    assert (out / "simulation.md").read_text() == completed.stdout
    for name in ("speedup.png", "utilisation.png", "scaling.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC), name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dist", "no_such"], "--dist 'no_such' is not a known distribution; choose from"),
        (["--devices", "8,0"], "argument --devices: '0' must be an integer >= 1"),
        (["--csv", "missing.csv", "--column", "x"], "missing.csv not found"),
        (["--csv", "{csv}", "--column", "frames"], "has no column(s) ['frames']"),
        (["--csv", "{bad_csv}", "--column", "seconds"], "row 3 column 'seconds' holds 'abc', not a finite number"),
        (["--csv", "{csv}", "--column", "seconds", "--scale", "-1"], "row 2 column 'seconds' holds 12"),
        (["--cost-model", "{csv}"], "is not a CostModel JSON"),
        (["--dist", "activitynet", "--devices", "1", "--tokens-per-device", "1024"],
         "longest sample (62528 tokens) needs a power-of-two degree >= 62"),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_the_item(tmp_path, capsys, args, message):
    csv = tmp_path / "lengths.csv"
    csv.write_text("sample_id,seconds\na,12\nb,30\n")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("sample_id,seconds\na,12\nb,abc\n")
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(csv=csv, bad_csv=bad_csv) for arg in args] + ["--steps", "1"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_line_reports_bad_input_without_a_traceback():
    completed = run_cli("--dist", "no_such")
    assert completed.returncode == 2
    assert completed.stderr.startswith("python -m lightning_dhp.simulate: error: --dist 'no_such'")
    assert "Traceback" not in completed.stderr


def test_user_csv_rule_gives_the_stated_token_lengths(tmp_path):
    csv = tmp_path / "clips.csv"
    csv.write_text("sample_id,seconds\n" + "".join(f"c{i},{seconds}\n" for i, seconds in enumerate([1.5, 20, 300])))
    source = csv_source(str(csv), "seconds", scale=64, offset=100)
    assert source.lengths.tolist() == [196, 1380, 19300]
    assert source.rule == "clips.csv: tokens = ceil(seconds * 64 + 100)"


COST = CostModel.default()


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 16_000), min_size=1, max_size=40),  # fits 2 devices
    exponent=st.integers(1, 4),
    node_size=st.sampled_from([2, 4, 8]),
)
def test_the_planner_lower_bound_holds_for_dhp_and_every_static_ring_policy(lengths, exponent, node_size):
    """The planner promises ``lower_bound <= predicted_time`` for any plan of the batch, not that DHP
    beats every static degree; the simulator's static ring times must respect that bound too."""
    source = LengthSource("random", "hypothesis", np.array(lengths))
    config = SimulationConfig(devices=(2**exponent,), samples_per_device=2, tokens_per_device=8192,
                              node_size=node_size, steps=1, pool_size=4)
    row = simulate_device_count(source, 2**exponent, config, COST)
    for policy, seconds in row.step_time_s.items():
        if not policy.startswith("ulysses"):
            assert row.lower_bound_s <= seconds * (1 + 1e-9), policy


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 16384), min_size=1, max_size=30), degree=st.sampled_from([1, 2, 4, 8]))
def test_retiming_a_static_plan_within_one_node_reproduces_the_planner_time(lengths, degree):
    plan = static_plan(lengths, 8, 16384, degree, COST)
    assert retimed(plan, ring_group_time(COST), node_size=8) == pytest.approx(plan.predicted_time, rel=1e-12)


def test_ulysses_matches_the_ring_at_degree_1_and_moves_the_stated_volume():
    ring, ulysses = ring_group_time(COST), ulysses_group_time(COST, volume_ratio=2.0)
    assert ulysses([1000, 3000], 1, False) == pytest.approx(ring([1000, 3000], 1, False))
    lengths, degree = [4096, 8192], 4
    compute = (COST.attention_s_per_token2 * (4096**2 + 8192**2) + COST.linear_s_per_token * 12288) / degree
    all_to_all = 2.0 * COST.kv_bytes_per_token * (12288 / degree) / degree / COST.inter_node_bytes_per_s
    expected = COST.overhead_s + compute + (degree - 1) * (COST.ring_step_latency_s + all_to_all)
    assert ulysses(lengths, degree, True) == pytest.approx(expected)
    vision = dataclasses.replace(COST, vision_s_per_patch=1e-5)
    assert ulysses_group_time(vision, volume_ratio=2.0)(lengths, degree, True, [4000, 0]) == pytest.approx(
        expected + 1e-5 * 4000 / degree)


def test_presets_are_pinned():
    pinned = {
        name: (preset.model, preset.device, preset.tokens_per_device, preset.distributions, preset.ulysses())
        for name, preset in PRESETS.items()
    }
    videos = ("activitynet", "epic_kitchens_videos")
    mixes = ("activitynet+mooncake", "activitynet+azure_conv")
    assert pinned == {
        "internvl3-2b-910b": ("internvl3-2b", "Ascend 910B", 32768, videos, (2, 56 / 12)),
        "internvl3-2b-h100": ("internvl3-2b", "H100", 32768, videos, (2, 56 / 12)),
        "internvl3-8b-910b": ("internvl3-8b", "Ascend 910B", 16384, videos, (4, 128 / 24)),
        "internvl3-8b-h100": ("internvl3-8b", "H100", 16384, videos, (4, 128 / 24)),
        "qwen2.5-vl-7b-910b": ("qwen2.5-vl-7b", "Ascend 910B", 16384, videos, (4, 128 / 24)),
        "qwen2.5-vl-7b-h100": ("qwen2.5-vl-7b", "H100", 16384, videos, (4, 128 / 24)),
        "qwen2.5-vl-7b-vision-h100": ("qwen2.5-vl-7b", "H100", 16384, mixes, (4, 128 / 24)),
        "internvl3-8b-vision-h100": ("internvl3-8b", "H100", 16384, mixes, (4, 128 / 24)),
    }
    assert PRESETS["qwen2.5-vl-7b-h100"].cost_model() == CostModel.for_transformer(
        layers=28, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064, device="H100")
    for name in ("qwen2.5-vl-7b", "internvl3-8b"):
        assert PRESETS[f"{name}-vision-h100"].cost_model() == CostModel.for_transformer(
            MODEL_PRESETS[name], vision=VISION_PRESETS[name], device="H100")
        assert VISION_PRESETS[name].merge_size ** 2 == PATCHES_PER_VISUAL_TOKEN


def test_a_multimodal_source_takes_its_patches_from_the_video_rule():
    source = multimodal_source("activitynet", "mooncake")
    videos, text = token_lengths("activitynet"), token_lengths("mooncake")
    assert source.name == "activitynet+mooncake"
    np.testing.assert_array_equal(source.lengths, np.concatenate([videos, text]))
    # 1 fps x 64 tokens per frame + 128 text tokens: 4 patches per visual token, none for text
    np.testing.assert_array_equal(source.vision_patches, np.concatenate([4 * (videos - 128), np.zeros(len(text))]))
    assert source.stats().with_vision == pytest.approx(len(videos) / (len(videos) + len(text)))
    assert "4 vision patches per visual token" in source.rule and "Mooncake conversation trace" in source.rule
    fewer = multimodal_source("activitynet", "azure_conv", params={"tokens_per_frame": 16})
    assert fewer.vision_patches.max() == 4 * 16 * (videos.max() - 128) // 64


def test_the_vision_preset_compares_vision_aware_and_vision_blind_dhp(tmp_path, capsys):
    json_path = tmp_path / "result.json"
    main(["--preset", "qwen2.5-vl-7b-vision-h100", "--dist", "activitynet+mooncake", "--quick", "--devices", "8,16",
          "--steps", "2", "--json", str(json_path)])
    report = capsys.readouterr().out
    assert "with its vision tower" in report and "62% of them with vision patches" in report
    assert "dhp-vision-blind over dhp per step" in report
    result = json.loads(json_path.read_text())
    assert result["cost_model"]["vision_s_per_patch"] == pytest.approx(6 * 642_611_200 / (989e12 * 0.4))
    for row in result["distributions"][0]["results"]:
        ratios = row["vision_blind_over_aware"]
        assert ratios["min"] <= ratios["p10"] <= ratios["median"] <= ratios["p90"] <= ratios["max"]
        assert ratios["median"] > 1.0  # ignoring the vision tower costs time
        assert row["step_time_s"]["dhp-vision-blind"] > row["step_time_s"]["dhp"]
        assert f"| {row['devices']} | {ratios['median']:.3f} | {ratios['p10']:.3f} |" in report


def test_retiming_uses_the_plans_vision_patches_or_the_given_ones():
    cost = dataclasses.replace(COST, vision_s_per_patch=1e-5)
    lengths, patches = [3000, 9000, 500, 12000, 700], [12000, 0, 2000, 0, 0]
    aware = plan_batch(lengths, 8, 8192, cost, node_size=4, vision_patches=patches)
    assert retimed(aware, ring_group_time(cost), node_size=4) == pytest.approx(aware.predicted_time, rel=1e-12)
    blind = plan_batch(lengths, 8, 8192, cost, node_size=4)
    expected = sum(
        max(cost.group_time([lengths[i] for i in group.samples], group.degree,
                            patches=[patches[i] for i in group.samples]) for group in round_.groups)
        for round_ in blind.rounds
    )
    assert retimed(blind, ring_group_time(cost), 4, vision_patches=patches) == pytest.approx(expected, rel=1e-12)


def test_a_preset_sets_the_cost_model_budget_and_distributions_unless_given(tmp_path):
    json_path = tmp_path / "result.json"
    main(["--preset", "internvl3-2b-h100", "--devices", "8", "--steps", "1", "--dist", "activitynet",
          "--json", str(json_path)])
    result = json.loads(json_path.read_text())
    assert result["cost_model"] == dataclasses.asdict(PRESETS["internvl3-2b-h100"].cost_model())
    assert result["config"]["tokens_per_device"] == 32768 and result["config"]["ulysses_heads"] == 2
    assert result["preset"]["name"] == "internvl3-2b-h100"
    assert [d["name"] for d in result["distributions"]] == ["activitynet"]


def test_a_preset_and_a_cost_model_file_conflict(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "internvl3-8b-910b", "--cost-model", "model.json", "--steps", "1"])
    assert exit_info.value.code == 2
    assert "both set the cost model; pass one" in capsys.readouterr().err


def test_the_provenance_stamp_names_the_date_the_machine_and_this_checkouts_commit():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=True).stdout.strip()
    stamped = stamp()
    assert list(stamped) == ["date", "machine"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", stamped["date"])
    assert re.search(r"\(\S+, \d+ CPUs, .*load average \d+\.\d\), commit ", stamped["machine"])
    assert stamped["machine"].endswith(f"commit {commit}")
