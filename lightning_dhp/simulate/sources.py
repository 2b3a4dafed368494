"""Where the simulated lengths come from: a named distribution's rule, a video and a text one mixed
(vision patches on the videos), or the user's CSV; each source quotes the rule that made it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_dhp.data.lengths import DISTRIBUTIONS, read_metadata, token_lengths
from lightning_dhp.simulate.config import SimulationError
from lightning_dhp.simulate.results import LengthStats

# Multimodal sources: every sample of a whole-video distribution (with vision patches) and of a text one
# (without); "<video>+<text>", e.g. activitynet+mooncake.
VIDEO_DISTRIBUTIONS = ("activitynet", "epic_kitchens_videos")
TEXT_DISTRIBUTIONS = ("mooncake", "azure_conv", "azure_code")
MULTIMODAL_DISTRIBUTIONS = tuple(f"{video}+{text}" for video in VIDEO_DISTRIBUTIONS for text in TEXT_DISTRIBUTIONS)
# Vision patches per visual token: both presets' towers merge 2 x 2 patches into one token (Qwen2-VL's
# spatial merge 2, InternVL's pixel shuffle 0.5), so a frame of (H/14) x (W/14) patches has a quarter as
# many tokens (64 tokens per frame: 224 x 224 pixels).
PATCHES_PER_VISUAL_TOKEN = 4


@dataclass(frozen=True)
class LengthSource:
    """Token lengths of one distribution (and each sample's vision patches, None: a text-only source) and
    the rule that made them (quoted in every report)."""

    name: str
    rule: str
    lengths: np.ndarray
    vision_patches: np.ndarray | None = None

    def stats(self) -> LengthStats:
        """Spread of the token lengths; ``cv`` (std / mean) is the heterogeneity the report ranks by."""
        lengths = self.lengths.astype(np.float64)
        return LengthStats(
            samples=float(len(lengths)),
            median=float(np.median(lengths)),
            mean=float(lengths.mean()),
            p99=float(np.percentile(lengths, 99)),
            max=float(lengths.max()),
            cv=float(lengths.std() / lengths.mean()),
            with_vision=None if self.vision_patches is None else float(np.mean(self.vision_patches > 0)),
        )

    def most_patches(self) -> int:
        """The most vision patches of any sample (0 for a text-only source)."""
        return 0 if self.vision_patches is None else int(self.vision_patches.max())


def named_source(name: str, *, data_dir: str | None = None, params: dict[str, float] | None = None) -> LengthSource:
    """A distribution of :data:`~lightning_dhp.data.lengths.DISTRIBUTIONS` or of
    :data:`MULTIMODAL_DISTRIBUTIONS` (see :func:`multimodal_source`) with optional rule overrides."""
    if name in MULTIMODAL_DISTRIBUTIONS:
        video, text = name.split("+")
        return multimodal_source(video, text, data_dir=data_dir, params=params)
    if name not in DISTRIBUTIONS:
        raise SimulationError(f"--dist {name!r} is not a known distribution; choose from "
                              f"{sorted(DISTRIBUTIONS) + list(MULTIMODAL_DISTRIBUTIONS)}")
    params = params or {}
    overrides = f" (overrides: {', '.join(f'{key}={value:g}' for key, value in params.items())})" if params else ""
    return LengthSource(name, DISTRIBUTIONS[name].description + overrides, _rule_lengths(name, data_dir, params))


def _rule_lengths(name: str, data_dir: str | None, params: dict[str, float]) -> np.ndarray:
    try:
        return token_lengths(name, data_dir=data_dir, **params)
    except TypeError as error:
        raise SimulationError(f"--param {params}: {error}; use the constants named in that rule") from None


def multimodal_source(
    video: str, text: str, *, data_dir: str | None = None, params: dict[str, float] | None = None
) -> LengthSource:
    """Every sample of the ``video`` distribution, with :data:`PATCHES_PER_VISUAL_TOKEN` vision patches per
    visual token, and of the ``text`` one, without; ``params`` override the video rule's constants.

    The patches come from the video rule itself: its visual tokens are its tokens with ``text_tokens=0``.
    """
    params = params or {}
    video_source = named_source(video, data_dir=data_dir, params=params)
    visual_tokens = _rule_lengths(video, data_dir, {**params, "text_tokens": 0})
    text_lengths = named_source(text, data_dir=data_dir).lengths
    rule = (f"every {video} video ({video_source.rule}) with {PATCHES_PER_VISUAL_TOKEN} vision patches per visual "
            f"token, i.e. (H/14) x (W/14) patches per frame, and every {text} sample "
            f"({DISTRIBUTIONS[text].description}) without patches")
    return LengthSource(
        f"{video}+{text}",
        rule,
        np.concatenate([video_source.lengths, text_lengths]),
        np.concatenate([visual_tokens * PATCHES_PER_VISUAL_TOKEN, np.zeros(len(text_lengths), dtype=np.int64)]),
    )


def csv_source(path: str, column: str, *, scale: float = 1.0, offset: float = 0.0) -> LengthSource:
    """Lengths from the user's CSV: ``tokens = ceil(column * scale + offset)`` per row."""
    values = read_metadata(path, [column])[column]
    tokens = np.ceil(values * scale + offset)
    bad = np.flatnonzero(~(tokens >= 1))
    if bad.size:
        row = int(bad[0])
        raise SimulationError(
            f"{path} row {row + 2} column {column!r} holds {values[row]:g}, which the rule "
            f"ceil({column} * {scale:g} + {offset:g}) turns into {tokens[row]:g} tokens; every sample needs "
            f">= 1 token: fix that row or raise --offset"
        )
    rule = f"{Path(path).name}: tokens = ceil({column} * {scale:g} + {offset:g})"
    return LengthSource(f"{Path(path).stem}:{column}", rule, tokens.astype(np.int64))


def batch_stream(population: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless global batches: consecutive slices of seeded shuffles of ``population``."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(population))])
        yield population[order[:batch_size]]
        order = order[batch_size:]
