"""Real per-sample length distributions: read the shared metadata CSVs and turn rows into tokens.

The CSVs (``$DHP_DATA_DIR``, an explicit ``data_dir``, or by default ``../shared/data`` beside a
source checkout, see its SOURCES.md) hold numbers only: video durations, image sizes, caption
lengths, LLM request token counts. Each named distribution in :data:`DISTRIBUTIONS` states the rule
that turns one row into one sample's token count; every constant of a rule (sampling fps, visual
tokens per frame, ...) is a keyword parameter of :func:`token_lengths`, so a figure can always be
reported together with its exact rule.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR_ENV = "DHP_DATA_DIR"
TEXT_COLUMNS = frozenset({"sample_id", "video_id", "subset", "trace"})


class LengthFileError(ValueError):
    """A metadata file is missing or malformed; the message names the file, row/column and the fix."""


def checkout_data_dir() -> Path | None:
    """``../shared/data`` beside the source checkout this package runs from; None for an installed package.

    A checkout is recognised by its ``setup.cfg`` next to the package folder (an installed package
    sits in ``site-packages``, which has none).
    """
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data" if (repo / "setup.cfg").is_file() else None


def shared_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Directory of the shared metadata CSVs.

    Looked up in order: ``explicit`` (the app's ``data.data_dir``), the ``DHP_DATA_DIR`` environment
    variable, then ``../shared/data`` beside a source checkout (where CI and the development machines
    keep it). An installed package has no default: set one of the first two.
    """
    fix = (f"set {DATA_DIR_ENV} to the folder holding the metadata CSVs, or pass it as data_dir "
           f"(the app: data.data_dir=/path/to/data)")
    if explicit is not None:
        directory, origin = Path(explicit), "the explicit path"
    elif os.environ.get(DATA_DIR_ENV):
        directory, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    elif (default := checkout_data_dir()) is not None:
        directory, origin = default, "the default ../shared/data beside the source checkout"
    else:
        raise LengthFileError(f"no data directory: this installed package has no default one; {fix}")
    if not directory.is_dir():
        raise LengthFileError(f"data directory {directory} (from {origin}) does not exist; {fix}")
    return directory


def _resolve(name_or_path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(name_or_path)
    candidate = path if path.is_absolute() or path.exists() else shared_data_dir(data_dir) / path
    if not candidate.is_file():
        raise LengthFileError(
            f"metadata file {candidate} not found; pass an existing path, a file name inside "
            f"the data directory, or set {DATA_DIR_ENV} to the folder that holds it"
        )
    return candidate


def read_metadata(
    name_or_path: str | os.PathLike[str],
    columns: Sequence[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, np.ndarray]:
    """Read ``columns`` of one metadata CSV as arrays (float64, or str for id/label columns).

    ``name_or_path`` is a file name inside :func:`shared_data_dir` or a path. Text columns are
    ``sample_id``, ``video_id``, ``subset`` and ``trace``; every other column must hold a finite
    number in every row, otherwise :class:`LengthFileError` names the file, row and column.
    """
    if not columns:
        raise ValueError("read_metadata needs at least one column name")
    path = _resolve(name_or_path, data_dir)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise LengthFileError(f"{path} is empty; expected a CSV header row with columns {list(columns)}")
        missing = [column for column in columns if column not in header]
        if missing:
            raise LengthFileError(
                f"{path} has no column(s) {missing}; its header is {header}; "
                f"ask for one of those columns or fix the file's header"
            )
        indices = [header.index(column) for column in columns]
        values: list[list[Any]] = [[] for _ in columns]
        for row_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise LengthFileError(
                    f"{path} row {row_number} has {len(row)} fields but the header has {len(header)}; "
                    f"repair or remove that row"
                )
            for out, column, index in zip(values, columns, indices, strict=True):
                cell = row[index]
                if column in TEXT_COLUMNS:
                    out.append(cell)
                    continue
                try:
                    number = float(cell)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number):
                    raise LengthFileError(
                        f"{path} row {row_number} column {column!r} holds {cell!r}, not a finite number; "
                        f"repair or remove that row"
                    )
                out.append(number)
    if not values[0]:
        raise LengthFileError(f"{path} has a header but no data rows; use a file with at least one row")
    return {
        column: np.asarray(out, dtype=str if column in TEXT_COLUMNS else np.float64)
        for column, out in zip(columns, values, strict=True)
    }


def video_tokens(
    duration_s: np.ndarray,
    text_tokens: np.ndarray | int,
    *,
    sample_fps: float,
    tokens_per_frame: int,
    max_frames: int | None,
) -> np.ndarray:
    """Tokens of a video sample: ``max(1, floor(duration * sample_fps))`` frames (capped at
    ``max_frames``) times ``tokens_per_frame``, plus the text tokens."""
    frames = np.maximum(1, np.floor(duration_s * sample_fps)).astype(np.int64)
    if max_frames is not None:
        frames = np.minimum(frames, max_frames)
    return frames * tokens_per_frame + np.asarray(text_tokens, dtype=np.int64)


def image_tokens(width: np.ndarray, height: np.ndarray, *, patch_size: int, merge_size: int) -> np.ndarray:
    """Visual tokens of an image in a Qwen2-VL-style encoder: patches of ``patch_size`` pixels,
    ``merge_size`` x ``merge_size`` patches merged into one token (partial patches round up)."""
    side = patch_size * merge_size
    return (np.ceil(width / side) * np.ceil(height / side)).astype(np.int64)


def _text_tokens(n_chars: np.ndarray, chars_per_token: float, prompt_tokens: int) -> np.ndarray:
    return np.ceil(n_chars / chars_per_token).astype(np.int64) + prompt_tokens


def _whole_video(
    columns: Mapping[str, np.ndarray],
    *,
    sample_fps: float,
    tokens_per_frame: int = 64,
    max_frames: int | None = None,
    text_tokens: int = 128,
) -> np.ndarray:
    return video_tokens(
        columns["duration_s"],
        text_tokens,
        sample_fps=sample_fps,
        tokens_per_frame=tokens_per_frame,
        max_frames=max_frames,
    )


def _epic_segments(
    columns: Mapping[str, np.ndarray],
    *,
    sample_fps: float = 4.0,
    tokens_per_frame: int = 64,
    max_frames: int | None = None,
    chars_per_token: float = 4.0,
    prompt_tokens: int = 32,
) -> np.ndarray:
    text = _text_tokens(columns["n_chars"], chars_per_token, prompt_tokens)
    return video_tokens(
        columns["duration_s"],
        text,
        sample_fps=sample_fps,
        tokens_per_frame=tokens_per_frame,
        max_frames=max_frames,
    )


def _coco(
    columns: Mapping[str, np.ndarray],
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    chars_per_token: float = 4.0,
    prompt_tokens: int = 32,
) -> np.ndarray:
    visual = image_tokens(columns["width"], columns["height"], patch_size=patch_size, merge_size=merge_size)
    return visual + _text_tokens(columns["n_chars"], chars_per_token, prompt_tokens)


def _mooncake(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    return (columns["n_input_tokens"] + columns["n_output_tokens"]).astype(np.int64)


def _azure(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    return (columns["n_context_tokens"] + columns["n_generated_tokens"]).astype(np.int64)


@dataclass(frozen=True)
class LengthDistribution:
    """One named distribution: which file and columns it reads and the rule that makes tokens."""

    name: str
    file: str
    columns: tuple[str, ...]
    rule: Callable[..., np.ndarray]
    description: str
    row_filter: tuple[str, str] | None = field(default=None)  # (text column, required value)


DISTRIBUTIONS: dict[str, LengthDistribution] = {
    dist.name: dist
    for dist in (
        LengthDistribution(
            "activitynet",
            "activitynet_v13_videos.csv",
            ("duration_s",),
            partial(_whole_video, sample_fps=1.0),
            "ActivityNet v1.3 videos: max(1, floor(duration_s * sample_fps)) frames (capped at "
            "max_frames) x tokens_per_frame + text_tokens; defaults 1 fps, 64 tokens/frame, 128 text",
        ),
        LengthDistribution(
            "epic_kitchens_videos",
            "epic_kitchens100_videos.csv",
            ("duration_s",),
            partial(_whole_video, sample_fps=0.5),
            "EPIC-KITCHENS-100 whole videos: floor(duration_s * sample_fps) frames x tokens_per_frame "
            "+ text_tokens; defaults 0.5 fps, 64 tokens/frame, 128 text",
        ),
        LengthDistribution(
            "epic_kitchens_segments",
            "epic_kitchens100_val_segments.csv",
            ("duration_s", "n_chars"),
            _epic_segments,
            "EPIC-KITCHENS-100 val action segments: max(1, floor(duration_s * sample_fps)) frames x "
            "tokens_per_frame + ceil(n_chars / chars_per_token) + prompt_tokens; defaults 4 fps, "
            "64 tokens/frame, 4 chars/token, 32 prompt",
        ),
        LengthDistribution(
            "coco",
            "coco2017_val_captions.csv",
            ("width", "height", "n_chars"),
            _coco,
            "COCO 2017 val captions: ceil(w / (patch*merge)) * ceil(h / (patch*merge)) image tokens "
            "+ ceil(n_chars / chars_per_token) + prompt_tokens; defaults patch 14, merge 2, "
            "4 chars/token, 32 prompt",
        ),
        LengthDistribution(
            "mooncake",
            "mooncake_conversation_tokens.csv",
            ("n_input_tokens", "n_output_tokens"),
            _mooncake,
            "Mooncake conversation trace: n_input_tokens + n_output_tokens",
        ),
        LengthDistribution(
            "azure_conv",
            "azure_llm_2023_tokens.csv",
            ("n_context_tokens", "n_generated_tokens"),
            _azure,
            "Azure LLM 2023 conversation trace: n_context_tokens + n_generated_tokens",
            row_filter=("trace", "conv"),
        ),
        LengthDistribution(
            "azure_code",
            "azure_llm_2023_tokens.csv",
            ("n_context_tokens", "n_generated_tokens"),
            _azure,
            "Azure LLM 2023 code trace: n_context_tokens + n_generated_tokens",
            row_filter=("trace", "code"),
        ),
    )
}


def _distribution(name: str) -> LengthDistribution:
    if name not in DISTRIBUTIONS:
        raise KeyError(f"unknown length distribution {name!r}; choose one of {sorted(DISTRIBUTIONS)}")
    return DISTRIBUTIONS[name]


def token_lengths(name: str, *, data_dir: str | os.PathLike[str] | None = None, **rule_params: Any) -> np.ndarray:
    """Token length (int64, >= 1) of every row of the named distribution, by its stated rule.

    ``rule_params`` override the rule's constants (see ``DISTRIBUTIONS[name].description``), e.g.
    ``token_lengths("activitynet", sample_fps=2, tokens_per_frame=256)``.
    """
    dist = _distribution(name)
    columns = list(dist.columns) + ([dist.row_filter[0]] if dist.row_filter else [])
    table = read_metadata(dist.file, columns, data_dir=data_dir)
    if dist.row_filter:
        column, value = dist.row_filter
        keep = table[column] == value
        table = {key: array[keep] for key, array in table.items()}
    try:
        lengths = dist.rule(table, **rule_params)
    except TypeError as error:
        raise TypeError(f"bad parameter for distribution {name!r} ({dist.description}): {error}") from None
    return np.maximum(np.asarray(lengths, dtype=np.int64), 1)


def sample_token_lengths(
    name: str,
    num_samples: int,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    **rule_params: Any,
) -> np.ndarray:
    """``num_samples`` token lengths drawn with replacement from the named distribution (seeded)."""
    population = token_lengths(name, data_dir=data_dir, **rule_params)
    return np.random.default_rng(seed).choice(population, size=num_samples, replace=True)
