"""Device memory: what a context-parallel group of ``d`` ranks may hold.

Two budgets, both spread evenly over a group's ranks at run time: ``d x tokens_per_device`` padded
language-model tokens, and, when a vision budget is set, ``d x vision_patches_per_device`` vision-tower
patches (the runtime spreads a group's whole images and temporal patches over its ranks). Padding
depends on the degree, patches do not, so a sample's patches alone ask for ``ceil(P / budget)`` ranks.
"""

from __future__ import annotations

import numpy as np


def fits_memory(
    tokens: np.ndarray | float,
    token_capacity: np.ndarray | int,
    patches: np.ndarray | float | None = None,
    patch_capacity: np.ndarray | int | None = None,
) -> np.ndarray | bool:
    """Whether groups holding ``tokens`` padded tokens and ``patches`` vision patches fit their memory, whose
    capacities are their degree x ``tokens_per_device`` and x ``vision_patches_per_device`` (broadcasting;
    the patches are checked only when both they and ``patch_capacity`` are given)."""
    fits = tokens <= token_capacity
    if patches is None or patch_capacity is None:
        return fits
    return fits & (patches <= patch_capacity)


def vision_budget(patches: np.ndarray | None, vision_patches_per_device: int | None) -> int | None:
    """The vision budget planning enforces: None when there is none or no sample has patches."""
    return None if patches is None else vision_patches_per_device


def vision_min_degrees(patches: np.ndarray, vision_patches_per_device: int) -> np.ndarray:
    """Fewest ranks that hold each count of ``patches``: ``ceil(patches / vision_patches_per_device)``."""
    return -(-patches // vision_patches_per_device)
