"""Input checks shared by every planner entry point, each sample's minimum CP degree, and divisors."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from lightning_dhp.planner.memory import vision_budget, vision_min_degrees
from lightning_dhp.planner.plan import PlanError

MAX_LENGTH = 2**40  # far beyond any real sample; keeps padded sums and squares exact in int64/float64


def check_count(value: object, name: str, fix: str) -> int:
    """``value`` as an int >= 1, or a PlanError naming ``name`` and ``fix``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise PlanError(f"{name}={value!r} must be an integer >= 1; {fix}")
    return int(value)


def check_lengths(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Lengths as an int64 array; each must be a positive integer (integral floats are accepted)."""
    if isinstance(lengths, list) and all(type(value) is int for value in lengths):  # (not bools)
        with contextlib.suppress(OverflowError):  # past int64: the checks below name the sample
            lengths = np.array(lengths, dtype=np.int64)
    clean_array = isinstance(lengths, np.ndarray) and lengths.ndim == 1 and np.issubdtype(lengths.dtype, np.integer)
    if clean_array and lengths.size and lengths.min() >= 1 and lengths.max() <= MAX_LENGTH:
        return lengths.astype(np.int64)  # the common case, checked in one pass
    values = list(lengths)
    if not values:
        raise PlanError("lengths is empty; pass the token length of at least one sample")
    for index, value in enumerate(values):
        value = _shown(value)
        if not _is_whole(value, 1, math.inf):
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
        bad = [index for index, value in enumerate(values) if not _is_whole(value, 0)]
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


def _is_whole(value: object, low: int, high: float = MAX_LENGTH) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and whole, in ``[low, high]``."""
    value = _shown(value)
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    return is_number and math.isfinite(value) and value == int(value) and low <= value <= high


def min_degrees(
    lengths: np.ndarray,
    tokens_per_device: int,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> np.ndarray:
    """Smallest degree at which each sample fits: padded(L, d) <= d * tokens_per_device and, with a vision
    budget, ``patches <= d * vision_patches_per_device``.

    Degree 1 needs ``L <= C``. For ``d >= 2`` the padded length is ``2d * ceil(L / 2d)``, so the
    rule reads ``ceil(L / 2d) <= C // 2``, i.e. ``d >= ceil(L / (2 * (C // 2)))``. With ``C == 1``
    no degree above 1 fits; such samples get a huge sentinel degree. Patches ask for
    ``ceil(P / vision_patches_per_device)`` ranks (:func:`~lightning_dhp.planner.memory.vision_min_degrees`);
    when that is 2 or more, the tokens must fit by the rule for ``d >= 2``.
    """
    half = tokens_per_device // 2
    if half == 0:
        multi = np.full(lengths.shape, np.iinfo(np.int64).max // 4, dtype=np.int64)
    else:
        multi = np.maximum(2, -(-lengths // (2 * half)))
    degrees = np.where(lengths <= tokens_per_device, 1, multi)
    budget = vision_budget(patches, vision_patches_per_device)
    if budget is None:
        return degrees
    by_patches = vision_min_degrees(patches, budget)
    return np.where(by_patches > 1, np.maximum(by_patches, multi), degrees)


def divisors(number: int) -> list[int]:
    """All positive divisors of ``number``, ascending (the degrees a static CP layout can use)."""
    return [candidate for candidate in range(1, number + 1) if number % candidate == 0]


def checked_min_degrees(
    lengths: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> np.ndarray:
    """Each sample's minimum degree (:func:`min_degrees`) of checked inputs, or the PlanError of
    :func:`check_every_sample_fits` when some sample fits no group of ``num_devices``."""
    degrees = min_degrees(lengths, tokens_per_device, patches, vision_patches_per_device)
    check_every_sample_fits(lengths, degrees, num_devices, tokens_per_device, patches, vision_patches_per_device)
    return degrees


def check_every_sample_fits(
    lengths: np.ndarray,
    degrees: np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    patches: np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> None:
    """PlanError for the first sample whose minimum degree exceeds ``num_devices``, naming the budget it
    breaks (its tokens when both do)."""
    too_long = np.flatnonzero(degrees > num_devices)
    if too_long.size == 0:
        return
    index = int(too_long[0])
    token_degree = int(min_degrees(lengths[index : index + 1], tokens_per_device)[0])
    if token_degree > num_devices:
        length = int(lengths[index])
        holding = f"length {length} tokens"
        needed = length if num_devices == 1 else min(length, 2 * -(-length // (2 * num_devices)))
        if tokens_per_device == 1:
            needs = "it needs tokens_per_device >= 2 to be split across devices at all"
            fix = f"raise tokens_per_device to >= {needed}"
        else:
            needs = f"it needs {token_degree} devices at tokens_per_device={tokens_per_device}"
            fix = f"raise tokens_per_device to >= {needed} or use >= {int(degrees[index])} devices"
    else:  # its vision patches refuse it
        count = int(patches[index])
        holding = f"{count} vision patches"
        if tokens_per_device == 1:
            needs = (f"tokens_per_device=1 keeps every sample on one device, where its patches need "
                     f"vision_patches_per_device >= {count}")
            fix = f"raise vision_patches_per_device to >= {count} or tokens_per_device to >= 2"
        else:
            needs = f"it needs {int(degrees[index])} devices at vision_patches_per_device={vision_patches_per_device}"
            fix = (f"raise vision_patches_per_device to >= {-(-count // num_devices)} or use >= "
                   f"{int(degrees[index])} devices")
    raise PlanError(
        f"sample {index} has {holding} and cannot fit even on all num_devices={num_devices} "
        f"devices ({needs}); {fix}, or drop/truncate that sample"
    )


def refuse_over_degree(
    index: int, holding: str, degree: int, budget_name: str, budget: int, per_device: int, unit: str,
    fitting: list[int],
) -> NoReturn:
    """Raise the PlanError for sample ``index`` (``holding`` what it holds) that needs ``per_device`` ``unit``
    per device at the fixed ``degree``, over ``budget_name``; ``fitting``: the degrees that would hold it."""
    raise PlanError(
        f"sample {index} has {holding} and needs {per_device} {unit} per device at degree {degree}, over "
        f"{budget_name}={budget}; use a degree in {fitting} or raise {budget_name} to >= {per_device}"
    )


def check_inputs(
    lengths: Sequence[int] | np.ndarray,
    num_devices: int,
    tokens_per_device: int,
    node_size: int | None,
    vision_patches: Sequence[int] | np.ndarray | None = None,
    vision_patches_per_device: int | None = None,
) -> tuple[np.ndarray, int, int, int | None, np.ndarray | None, int | None]:
    """Checked lengths, device count, capacity, node size, vision patches (see :func:`check_vision_patches`)
    and vision budget (None: none); a PlanError names the bad one."""
    lengths_array = check_lengths(lengths)
    num_devices = check_count(num_devices, "num_devices", "use at least one device")
    tokens_per_device = check_count(tokens_per_device, "tokens_per_device", "give each device room for >= 1 token")
    if node_size is not None:
        node_size = check_count(node_size, "node_size", "pass the ranks per node, or None for one flat node")
    patches = check_vision_patches(vision_patches, len(lengths_array))
    if vision_patches_per_device is not None:
        vision_patches_per_device = check_count(
            vision_patches_per_device, "vision_patches_per_device",
            "give each device room for >= 1 vision patch, or pass None for no vision budget",
        )
    return lengths_array, num_devices, tokens_per_device, node_size, patches, vision_patches_per_device
