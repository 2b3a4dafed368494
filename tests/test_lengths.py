"""Real length distributions: locating the data, reading metadata, the per-dataset token rules."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from lightning_dhp.data import (
    DISTRIBUTIONS,
    LengthFileError,
    read_metadata,
    sample_token_lengths,
    shared_data_dir,
    token_lengths,
)
from tests.helpers import shared_data_available

needs_data = pytest.mark.skipif(not shared_data_available(), reason="shared/data is not present")


def raw_rows(name: str) -> list[dict[str, str]]:
    with (shared_data_dir() / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_data_dir_order_explicit_then_environment_then_repo_default(tmp_path, monkeypatch):
    monkeypatch.setenv("DHP_DATA_DIR", str(tmp_path))
    assert shared_data_dir() == tmp_path
    explicit = tmp_path / "elsewhere"
    explicit.mkdir()
    assert shared_data_dir(explicit) == explicit
    monkeypatch.setenv("DHP_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(LengthFileError, match=r"missing \(from \$DHP_DATA_DIR\) does not exist; set DHP_DATA_DIR"):
        shared_data_dir()


def test_data_dir_default_is_beside_a_checkout_and_absent_when_installed(monkeypatch):
    from lightning_dhp.data import lengths

    repo = Path(__file__).resolve().parents[1]
    assert lengths.checkout_data_dir() == repo.parent / "shared" / "data"
    monkeypatch.delenv("DHP_DATA_DIR", raising=False)
    monkeypatch.setattr(lengths, "checkout_data_dir", lambda: None)  # what an installed package sees
    with pytest.raises(LengthFileError, match=r"no data directory: .* set DHP_DATA_DIR .* data\.data_dir="):
        shared_data_dir()


def write_csv(path, text: str):
    path.write_text(text)
    return path


def test_read_metadata_types_and_every_malformed_case(tmp_path):
    good = write_csv(tmp_path / "good.csv", "sample_id,duration_s,frames\na,1.5,30\nb,2,60\n")
    table = read_metadata(good, ["sample_id", "duration_s"])
    assert table["sample_id"].tolist() == ["a", "b"]
    assert table["duration_s"].dtype == np.float64 and table["duration_s"].tolist() == [1.5, 2.0]
    cases = [
        (tmp_path / "absent.csv", ["frames"], r"absent.csv not found; pass an existing path"),
        (write_csv(tmp_path / "empty.csv", ""), ["frames"], r"empty.csv is empty; expected a CSV header"),
        (write_csv(tmp_path / "header.csv", "frames\n"), ["frames"], r"header.csv has a header but no data rows"),
        (
            good,
            ["fps"],
            r"good.csv has no column\(s\) \['fps'\]; its header is \['sample_id', 'duration_s', 'frames'\]",
        ),
        (
            write_csv(tmp_path / "text.csv", "frames\n3\nabc\n"),
            ["frames"],
            r"text.csv row 3 column 'frames' holds 'abc', not a finite number; repair or remove that row",
        ),
        (write_csv(tmp_path / "blank.csv", "a,frames\nx,3\ny,\n"), ["frames"], r"row 3 column 'frames' holds ''"),
        (write_csv(tmp_path / "inf.csv", "frames\ninf\n"), ["frames"], r"row 2 column 'frames' holds 'inf'"),
        (
            write_csv(tmp_path / "ragged.csv", "a,frames\nx,3,9\n"),
            ["frames"],
            r"ragged.csv row 2 has 3 fields but the header has 2; repair or remove that row",
        ),
    ]
    for path, columns, message in cases:
        with pytest.raises(LengthFileError, match=message):
            read_metadata(path, columns)
    with pytest.raises(ValueError, match="at least one column"):
        read_metadata(good, [])


@needs_data
def test_read_metadata_finds_shared_files_by_name():
    table = read_metadata("activitynet_v13_videos.csv", ["duration_s"])
    assert len(table["duration_s"]) == 19228
    assert table["duration_s"].min() > 0


@needs_data
def test_activitynet_rule_is_frames_at_sample_fps_times_tokens_per_frame_plus_text():
    rows = raw_rows("activitynet_v13_videos.csv")
    lengths = token_lengths("activitynet", sample_fps=2.0, tokens_per_frame=100, text_tokens=7, max_frames=64)
    expected = [min(64, max(1, math.floor(float(row["duration_s"]) * 2.0))) * 100 + 7 for row in rows]
    assert lengths.tolist() == expected
    default = token_lengths("activitynet")
    assert default[0] == max(1, math.floor(float(rows[0]["duration_s"]))) * 64 + 128


@needs_data
def test_coco_and_segment_rules_recomputed_from_the_csv():
    rows = raw_rows("coco2017_val_captions.csv")[:50]
    coco = token_lengths("coco")[:50]
    for row, length in zip(rows, coco, strict=True):
        image = math.ceil(int(row["width"]) / 28) * math.ceil(int(row["height"]) / 28)
        assert length == image + math.ceil(int(row["n_chars"]) / 4) + 32
    rows = raw_rows("epic_kitchens100_val_segments.csv")[:50]
    segments = token_lengths("epic_kitchens_segments", sample_fps=1.0)[:50]
    for row, length in zip(rows, segments, strict=True):
        frames = max(1, math.floor(float(row["duration_s"])))
        assert length == frames * 64 + math.ceil(int(row["n_chars"]) / 4) + 32


@needs_data
def test_llm_traces_sum_prompt_and_output_and_split_azure_by_trace():
    rows = raw_rows("azure_llm_2023_tokens.csv")
    conv = [int(r["n_context_tokens"]) + int(r["n_generated_tokens"]) for r in rows if r["trace"] == "conv"]
    code = [int(r["n_context_tokens"]) + int(r["n_generated_tokens"]) for r in rows if r["trace"] == "code"]
    assert token_lengths("azure_conv").tolist() == conv
    assert token_lengths("azure_code").tolist() == code
    first = raw_rows("mooncake_conversation_tokens.csv")[0]
    assert token_lengths("mooncake")[0] == int(first["n_input_tokens"]) + int(first["n_output_tokens"])


@needs_data
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_every_distribution_gives_positive_integer_lengths_and_states_its_rule(name):
    lengths = token_lengths(name)
    assert lengths.dtype == np.int64 and lengths.min() >= 1 and len(lengths) > 100
    assert DISTRIBUTIONS[name].description and DISTRIBUTIONS[name].file.endswith(".csv")
    drawn = sample_token_lengths(name, 64, seed=5)
    assert drawn.tolist() == sample_token_lengths(name, 64, seed=5).tolist()
    assert set(drawn.tolist()) <= set(lengths.tolist())


def test_unknown_distribution_and_bad_rule_parameter(tmp_path):
    with pytest.raises(KeyError, match=r"unknown length distribution 'webvid'; choose one of \['activitynet'"):
        token_lengths("webvid")
    write_csv(tmp_path / "activitynet_v13_videos.csv", "duration_s\n10\n")
    with pytest.raises(TypeError, match=r"bad parameter for distribution 'activitynet' \(ActivityNet"):
        token_lengths("activitynet", data_dir=tmp_path, frames_per_second=2)
    assert token_lengths("activitynet", data_dir=tmp_path).tolist() == [10 * 64 + 128]
