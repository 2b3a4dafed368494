"""Input checks shared by every planner entry point, each sample's minimum CP degree, and divisors."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from lightning_dhp.planner.plan import PlanError

MAX_LENGTH = 2**40  # far beyond any real sample; keeps padded sums and squares exact in int64/float64


def check_count(value: object, name: str, fix: str) -> int:
    """``value`` as an int >= 1, or a PlanError naming ``name`` and ``fix``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise PlanError(f"{name}={value!r} must be an integer >= 1; {fix}")
    return int(value)


def check_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Lengths as an int64 array; each must be a positive integer (integral floats are accepted)."""
    clean_array = isinstance(lengths, np.ndarray) and lengths.ndim == 1 and np.issubdtype(lengths.dtype, np.integer)
    if clean_array and lengths.size and lengths.min() >= 1 and lengths.max() <= MAX_LENGTH:
        return lengths.astype(np.int64)  # the common case, checked in one pass
    values = list(lengths)
    if not values:
        raise PlanError("lengths is empty; pass the token length of at least one sample")
    for index, value in enumerate(values):
        value = _shown(value)
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value) or value != int(value) or value < 1:
            raise PlanError(
                f"sample {index} has length {value!r}; every length must be a positive integer number "
                f"of tokens (>= 1); drop that sample or fix its length"
            )
        if value > MAX_LENGTH:
            raise PlanError(
                f"sample {index} has length {value!r}, above the supported {MAX_LENGTH} tokens; "
                f"drop or truncate that sample"
            )
    return np.array([int(value) for value in values], dtype=np.int64)


def check_vision_patches(patches: Sequence[int] | np.ndarray | None, num_samples: int) -> np.ndarray | None:
    """Vision patches per sample as an int64 array, or None when there are none (None or all zero).

    One whole number >= 0 per sample (integral floats are accepted); a PlanError names the positions
    that break it. All zero is the same as None, so such plans are those of text-only batches.
    """
    if patches is None:
        return None
    values = patches if isinstance(patches, np.ndarray) else list(patches)
    if len(values) != num_samples:
        raise PlanError(
            f"vision_patches has {len(values)} entries but there are {num_samples} samples; "
            f"pass one patch count per sample (0 for text)"
        )
    clean_array = isinstance(values, np.ndarray) and values.ndim == 1 and np.issubdtype(values.dtype, np.integer)
    if not (clean_array and (not values.size or (values.min() >= 0 and values.max() <= MAX_LENGTH))):
        bad = [index for index, value in enumerate(values) if not _is_count(value)]
        if bad:
            shown = ", ".join(f"{index} ({_shown(values[index])!r})" for index in bad[:10])
            more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise PlanError(
                f"vision_patches of sample(s) {shown}{more} must be whole numbers of patches in "
                f"[0, {MAX_LENGTH}]; fix those counts (0 for a text sample)"
            )
    array = np.asarray(values, dtype=np.int64)
    return array if array.any() else None


def _shown(value: object) -> object:
    """``value`` as a message shows it: 0, not np.int64(0)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_count(value: object) -> bool:
    value = _shown(value)
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return is_number and math.isfinite(value) and value == int(value) and 0 <= value <= MAX_LENGTH


def min_degrees(lengths: np.ndarray, tokens_per_device: int) -> np.ndarray:
    """Smallest degree at which each sample fits: padded(L, d) <= d * tokens_per_device.

    Degree 1 needs ``L <= C``. For ``d >= 2`` the padded length is ``2d * ceil(L / 2d)``, so the
    rule reads ``ceil(L / 2d) <= C // 2``, i.e. ``d >= ceil(L / (2 * (C // 2)))``. With ``C == 1``
    no degree above 1 fits; such samples get a huge sentinel degree.
    """
    half = tokens_per_device // 2
    if half == 0:
        multi = np.full(lengths.shape, np.iinfo(np.int64).max // 4, dtype=np.int64)
    else:
        multi = np.maximum(2, -(-lengths // (2 * half)))
    return np.where(lengths <= tokens_per_device, 1, multi)


def divisors(number: int) -> list[int]:
    """All positive divisors of ``number``, ascending (the degrees a static CP layout can use)."""
    return [candidate for candidate in range(1, number + 1) if number % candidate == 0]


def check_every_sample_fits(
    lengths: np.ndarray, degrees: np.ndarray, num_devices: int, tokens_per_device: int
) -> None:
    """PlanError for the first sample whose minimum degree exceeds ``num_devices``."""
    too_long = np.flatnonzero(degrees > num_devices)
    if too_long.size == 0:
        return
    index = int(too_long[0])
    length = int(lengths[index])
    needed_capacity = length if num_devices == 1 else min(length, 2 * -(-length // (2 * num_devices)))
    if tokens_per_device == 1:
        needs = "it needs tokens_per_device >= 2 to be split across devices at all"
        devices_fix = ""
    else:
        needs = f"it needs {int(degrees[index])} devices at tokens_per_device={tokens_per_device}"
        devices_fix = f" or use >= {int(degrees[index])} devices"
    raise PlanError(
        f"sample {index} has length {length} tokens and cannot fit even on all num_devices={num_devices} "
        f"devices ({needs}); raise tokens_per_device to >= {needed_capacity}{devices_fix}, "
        f"or drop/truncate that sample"
    )


def check_inputs(
    lengths: Sequence[int] | np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    node_size: int | None,
    vision_patches: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, int, int, int | None, np.ndarray | None]:
    """Checked lengths, device count, capacity, node size and vision patches (see
    :func:`check_vision_patches`); a PlanError names the bad one."""
    lengths_array = check_lengths(lengths)
    num_devices = check_count(num_devices, "num_devices", "use at least one device")
    tokens_per_device = check_count(tokens_per_device, "tokens_per_device", "give each device room for >= 1 token")
    if node_size is not None:
        node_size = check_count(node_size, "node_size", "pass the ranks per node, or None for one flat node")
    patches = check_vision_patches(vision_patches, len(lengths_array))
    return lengths_array, num_devices, tokens_per_device, node_size, patches
