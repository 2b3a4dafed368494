"""Cost model: predicted seconds for one context-parallel group running a bin of samples.

For a group of degree ``d`` holding samples of padded lengths ``P_i`` (see :func:`padded_length`)
with ``V_i`` vision patches each:

    time = overhead
         + (a * sum P_i^2 + b * sum P_i) / d                          # attention + linear work
         + vision * sum V_i / d                                       # vision tower
         + [d > 1] * (d - 1) * (1 - overlap) * (step_latency + kv_bytes * sum P_i / d / bandwidth)

The vision line is the encoder (forward + backward) of the group's images and video frames: the
runtime spreads it over the group's ranks by whole images and temporal patches, balanced by cost, so
it divides by ``d`` (up to the granularity of one image or temporal patch). The last line is the
ring: ``d - 1`` steps, each sending the local K/V shard (``sum P_i / d`` tokens) to the next rank;
``overlap`` is the fraction hidden behind compute. Groups that cross a node boundary use
``inter_node_bytes_per_s``. Every term except the overhead and the per-step latency is a sum over
samples, so a group's time is ``fixed(d) + sum_i sample_cost(L_i, V_i, d)``; the planner relies on
that to move samples between groups in O(1).

Memory is the planner's ``tokens_per_device``: it counts the language model's (padded) tokens, visual
tokens included; the vision tower's own activations have a budget of their own,
``vision_patches_per_device`` (see :mod:`~lightning_dhp.planner.memory`), when one is set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_dhp.planner.placement import crosses_node

if TYPE_CHECKING:
    from lightning_dhp.planner.presets import VisionShape


def padded_length(length: int, degree: int) -> int:
    """Tokens a sample of ``length`` occupies at CP degree ``degree`` (zigzag needs 2*degree chunks).

    Degree 1 keeps the length as it is; otherwise the length is rounded up to a multiple of
    ``2 * degree``.
    """
    return int(padded_lengths(np.int64(length), degree))


def padded_lengths(lengths: np.ndarray, degrees: np.ndarray | int) -> np.ndarray:
    """Vectorised :func:`padded_length`: int64 ``lengths`` at ``degrees`` (broadcasting).

    The one statement of the zigzag padding rule; :class:`~lightning_dhp.attention.ZigzagLayout`
    pads with it too.
    """
    degrees = np.asarray(degrees)
    chunk = 2 * degrees - (degrees == 1)  # degree 1: chunks of one token, no padding
    return lengths + -lengths % chunk  # (three calls on the samples, not five: planning pads often)


def take(patches: np.ndarray | None, index: Any) -> np.ndarray | None:
    """``patches[index]``, or None when there are no vision patches (the planner's per-sample arrays)."""
    return None if patches is None else patches[index]


@dataclass(frozen=True)
class FitReport:
    """Fit quality of :meth:`CostModel.fit` in absolute percent error over the measurements."""

    median_abs_pct_error: float
    p90_abs_pct_error: float
    max_abs_pct_error: float
    num_measurements: int


@dataclass(frozen=True)
class CostModel:
    """Predicted group time in seconds (formula in the module docstring).

    The defaults describe a 7B-class decoder (32 layers, 8 KV heads of 128 dims, bf16) on one
    H100-class device, forward plus backward: ~6*7e9 FLOP/token at ~400 TFLOP/s for the linear
    part, causal attention ~1.6e6 FLOP per token pair per layer stack, K/V plus their gradients on
    the ring (~3 * 128 KiB per token), 100 GB/s inside a node and 25 GB/s across nodes.
    """

    attention_s_per_token2: float = 2.0e-9
    linear_s_per_token: float = 1.0e-4
    overhead_s: float = 5.0e-3
    ring_step_latency_s: float = 1.0e-3
    kv_bytes_per_token: float = 3 * 131072.0
    intra_node_bytes_per_s: float = 100e9
    inter_node_bytes_per_s: float = 25e9
    comm_overlap: float = 0.5
    vision_s_per_patch: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"CostModel.{field.name}={value!r} must be a finite number >= 0")
        if self.comm_overlap > 1:
            raise ValueError(f"CostModel.comm_overlap={self.comm_overlap} must lie in [0, 1]")
        if self.intra_node_bytes_per_s == 0 or self.inter_node_bytes_per_s == 0:
            raise ValueError("CostModel bandwidths must be > 0 bytes/s")

    @classmethod
    def default(cls) -> CostModel:
        """The documented default coefficients (used when a planner call gets no model)."""
        return cls()

    @classmethod
    def for_transformer(
        cls,
        config: Any = None,
        *,
        layers: int | None = None,
        hidden: int | None = None,
        heads: int | None = None,
        kv_heads: int | None = None,
        intermediate: int | None = None,
        vocab: int | None = None,
        head_dim: int | None = None,
        gated_mlp: bool = True,
        vision: VisionShape | None = None,
        device: str | Any = "H100",
        dtype_bytes: int = 2,
        comm_overlap: float = 0.5,
    ) -> CostModel:
        """A model of training a decoder of these dimensions on ``device`` (formulas and every preset
        number's source: :mod:`lightning_dhp.planner.presets`).

        Pass a Hugging Face config (object or dict; a VLM's ``text_config``/``llm_config`` is used),
        a :class:`~lightning_dhp.planner.presets.TransformerShape`, or the dimensions; ``kv_heads``
        defaults to ``heads``. ``vision`` is a :class:`~lightning_dhp.planner.presets.VisionShape`
        that sets ``vision_s_per_patch``; by default a VLM config's ``vision_config`` does, and no
        vision tower is modelled otherwise. ``device`` is ``"H100"``, ``"H200"``,
        ``"A100"``, ``"Ascend 910B"`` or a :class:`~lightning_dhp.planner.presets.DevicePreset`.
        """
        from lightning_dhp.planner.presets import (
            TransformerShape,
            VisionShape,
            device_preset,
            transformer_coefficients,
            vision_s_per_patch,
        )

        dimensions = {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": intermediate, "vocab": vocab}
        if config is not None:
            given = sorted(name for name, value in dimensions.items() if value is not None)
            if given:
                raise ValueError(f"for_transformer: pass a config or dimensions, not both (also got {given})")
            shape = config if isinstance(config, TransformerShape) else TransformerShape.from_config(config)
            if vision is None and not isinstance(config, TransformerShape):
                vision = VisionShape.from_config(config)
        else:
            missing = sorted(name for name, value in dimensions.items() if value is None)
            if missing:
                raise ValueError(f"for_transformer: missing {missing}; pass every dimension or an HF config")
            shape = TransformerShape(
                kv_heads=kv_heads or heads, head_dim=head_dim, gated_mlp=gated_mlp, **dimensions  # type: ignore[arg-type]
            )
        preset = device_preset(device)
        coefficients = transformer_coefficients(shape, preset, dtype_bytes)
        if vision is not None:
            coefficients["vision_s_per_patch"] = vision_s_per_patch(vision, preset)
        return cls(**coefficients, comm_overlap=comm_overlap)

    def fixed_time(self, degree: int) -> float:
        """Seconds a group of ``degree`` pays regardless of its samples (overhead + ring latency)."""
        ring = (degree - 1) * (1.0 - self.comm_overlap) * self.ring_step_latency_s
        return self.overhead_s + ring

    def _comm_s_per_token(self, degree: int, crosses_node: bool) -> float:
        if degree == 1:
            return 0.0
        bandwidth = self.inter_node_bytes_per_s if crosses_node else self.intra_node_bytes_per_s
        return (degree - 1) * (1.0 - self.comm_overlap) * self.kv_bytes_per_token / bandwidth

    def sample_costs(
        self, lengths: np.ndarray, degree: int, *, crosses_node: bool = False, patches: np.ndarray | None = None
    ) -> np.ndarray:
        """Each sample's additive share of a degree-``degree`` group's time (float64 seconds);
        ``patches``: each sample's vision patches (None: none)."""
        padded = padded_lengths(np.asarray(lengths, dtype=np.int64), degree).astype(np.float64)
        per_token = self.linear_s_per_token + self._comm_s_per_token(degree, crosses_node)
        work = self.attention_s_per_token2 * padded * padded + per_token * padded
        if patches is not None:
            work = work + self.vision_s_per_patch * np.asarray(patches, dtype=np.float64)
        return work / degree

    def group_time(
        self,
        lengths: Iterable[int],
        degree: int,
        *,
        crosses_node: bool = False,
        patches: Iterable[int] | None = None,
    ) -> float:
        """Predicted seconds for one group of ``degree`` devices running ``lengths`` (with ``patches``
        vision patches each, None: none) together."""
        patch_array = None if patches is None else np.fromiter(patches, dtype=np.int64)
        costs = self.sample_costs(
            np.fromiter(lengths, dtype=np.int64), degree, crosses_node=crosses_node, patches=patch_array
        )
        return self.fixed_time(degree) + math.fsum(costs)

    def times_over_degrees(
        self,
        lengths: np.ndarray,
        degrees: np.ndarray,
        *,
        node_size: int | None = None,
        patches: np.ndarray | None = None,
    ) -> np.ndarray:
        """Group time of the same ``lengths`` (and vision ``patches``, None: none) at each of ``degrees``
        (vectorised).

        ``lengths`` has shape ``(samples,)`` or ``(samples, len(degrees))`` and ``degrees`` any
        shape broadcasting against it; the sum runs over axis 0, for ``patches`` too. A group larger
        than ``node_size`` crosses a node and pays the inter-node bandwidth.
        """
        degrees = np.asarray(degrees, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim == 1:
            lengths = lengths.reshape((-1,) + (1,) * degrees.ndim)
        padded = padded_lengths(lengths, degrees).astype(np.float64)
        sum_padded = padded.sum(axis=0)
        sum_squares = (padded * padded).sum(axis=0)
        sum_patches = None if patches is None else np.asarray(patches, dtype=np.float64).sum(axis=0)
        return self.times_from_sums(sum_padded, sum_squares, degrees, node_size=node_size, sum_patches=sum_patches)

    def times_from_sums(
        self,
        sum_padded: np.ndarray,
        sum_squares: np.ndarray,
        degrees: np.ndarray,
        *,
        node_size: int | None = None,
        sum_patches: np.ndarray | None = None,
    ) -> np.ndarray:
        """Group times from the padded token sum, the sum of squared padded lengths and the vision
        patches (None: none)."""
        degrees = np.asarray(degrees, dtype=np.int64)
        ring_steps = (degrees - 1) * (1.0 - self.comm_overlap)
        if node_size is None:
            bandwidth = self.intra_node_bytes_per_s
        else:
            bandwidth = np.where(degrees > node_size, self.inter_node_bytes_per_s, self.intra_node_bytes_per_s)
        per_token = self.linear_s_per_token + ring_steps * self.kv_bytes_per_token / bandwidth
        work = self.attention_s_per_token2 * sum_squares + per_token * sum_padded
        if sum_patches is not None:
            work = work + self.vision_s_per_patch * sum_patches
        return self.overhead_s + ring_steps * self.ring_step_latency_s + work / degrees

    def placed_times(
        self,
        sum_padded: np.ndarray,
        sum_squares: np.ndarray,
        degrees: np.ndarray,
        first_ranks: np.ndarray,
        node_size: int | None,
        *,
        sum_patches: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`times_from_sums` of groups placed from ``first_ranks``: a group whose ranks span two nodes
        (:func:`~lightning_dhp.planner.placement.crosses_node`) pays the inter-node bandwidth."""
        times = self.times_from_sums(sum_padded, sum_squares, degrees, sum_patches=sum_patches)
        crosses = crosses_node(first_ranks, degrees, node_size)
        if crosses.any():  # node_size=0 makes every group pay the inter-node bandwidth
            crossing = self.times_from_sums(sum_padded, sum_squares, degrees, node_size=0, sum_patches=sum_patches)
            times = np.where(crosses, crossing, times)
        return times

    # -- fitting ---------------------------------------------------------------------------------

    @staticmethod
    def _features(lengths: Sequence[int], degree: int, patches: Sequence[int] | None) -> list[float]:
        padded = padded_lengths(np.asarray(lengths, dtype=np.int64), degree).astype(np.float64)
        tokens_per_rank = padded.sum() / degree
        ring_steps = degree - 1
        return [
            float((padded * padded).sum() / degree),
            float(tokens_per_rank),
            1.0,
            float(ring_steps),
            float(ring_steps * tokens_per_rank),
            float(sum(patches) / degree) if patches is not None else 0.0,
        ]

    @classmethod
    def fit(
        cls,
        measurements: Iterable[tuple[Sequence[int], int, float] | tuple[Sequence[int], int, float, Sequence[int]]],
        *,
        base: CostModel | None = None,
    ) -> tuple[CostModel, FitReport]:
        """Least-squares fit (non-negative, relative error) from ``(lengths, degree, seconds)`` or
        ``(lengths, degree, seconds, patches)`` (``patches``: each sample's vision patches).

        Fits the attention, linear, overhead, (when some degree is > 1) the exposed ring latency and
        per-token ring cost, and (when some measurement has vision patches) the seconds per patch;
        the fitted ring terms are stored with ``comm_overlap=0``. Terms the measurements cannot
        identify (no degree > 1, no patches) keep ``base``'s values (default: :meth:`default`).
        Returns the model and its fit error.
        """
        base = base or cls.default()
        measurements = [_measurement(measurement) for measurement in measurements]
        rows = [
            (cls._features(lengths, degree, patches), seconds) for lengths, degree, seconds, patches in measurements
        ]
        if len(rows) < 3:
            raise ValueError(f"CostModel.fit needs at least 3 measurements, got {len(rows)}")
        if any(seconds <= 0 or not math.isfinite(seconds) for _, seconds in rows):
            raise ValueError("CostModel.fit: every measured time must be a finite number of seconds > 0")
        features = np.array([row for row, _ in rows])
        seconds = np.array([s for _, s in rows])
        fits_ring, fits_vision = bool(np.any(features[:, 3] > 0)), bool(np.any(features[:, 5] > 0))
        active = [0, 1, 2] + ([3, 4] if fits_ring else []) + ([5] if fits_vision else [])
        coefficients = [float(value) for value in _nonnegative_relative_lstsq(features, seconds, active)]
        fitted: dict[str, float] = {
            "attention_s_per_token2": coefficients[0],
            "linear_s_per_token": coefficients[1],
            "overhead_s": coefficients[2],
        }
        if fits_ring:
            per_step_token = coefficients[4]
            fitted.update(
                ring_step_latency_s=coefficients[3],
                comm_overlap=0.0,
                intra_node_bytes_per_s=(base.kv_bytes_per_token / per_step_token if per_step_token > 0 else 1e18),
            )
        if fits_vision:
            fitted["vision_s_per_patch"] = coefficients[5]
        model = dataclasses.replace(base, **fitted)
        predicted = np.array([
            model.group_time(lengths, degree, patches=patches) for lengths, degree, _, patches in measurements
        ])
        errors = np.abs(predicted - seconds) / seconds * 100.0
        report = FitReport(
            median_abs_pct_error=float(np.median(errors)),
            p90_abs_pct_error=float(np.percentile(errors, 90)),
            max_abs_pct_error=float(errors.max()),
            num_measurements=len(rows),
        )
        return model, report

    # -- persistence -----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The coefficients as a JSON object string."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        """Inverse of :meth:`to_json`; unknown keys are an error naming them."""
        data: dict[str, Any] = json.loads(text)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CostModel field(s) {unknown} in JSON; known fields: {sorted(known)}")
        return cls(**{key: float(value) for key, value in data.items()})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostModel:
        """Read a model written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())


def _measurement(measurement: Sequence[Any]) -> tuple[list[int], int, float, list[int] | None]:
    """One :meth:`CostModel.fit` measurement as ``(lengths, degree, seconds, patches or None)``."""
    if len(measurement) not in (3, 4):
        raise ValueError(
            f"CostModel.fit: a measurement is (lengths, degree, seconds) or (lengths, degree, seconds, patches), "
            f"got {len(measurement)} items"
        )
    lengths, degree, seconds = list(measurement[0]), int(measurement[1]), float(measurement[2])
    patches = list(measurement[3]) if len(measurement) == 4 else None
    if patches is not None and len(patches) != len(lengths):
        raise ValueError(
            f"CostModel.fit: a measurement has {len(lengths)} lengths but {len(patches)} patch counts; "
            f"give one patch count per sample"
        )
    return lengths, degree, seconds, patches


def _nonnegative_relative_lstsq(features: np.ndarray, seconds: np.ndarray, active: list[int]) -> np.ndarray:
    """Coefficients >= 0 minimising the squared *relative* error; inactive columns stay 0.

    A small active-set loop: solve, pin every negative coefficient to zero, solve again.
    """
    coefficients = np.zeros(features.shape[1])
    weighted = features / seconds[:, None]
    free = list(active)
    while free:
        solution, *_ = np.linalg.lstsq(weighted[:, free], np.ones(len(seconds)), rcond=None)
        if np.all(solution >= 0):
            coefficients[free] = solution
            break
        free = [column for column, value in zip(free, solution, strict=True) if value > 0]
    return coefficients
