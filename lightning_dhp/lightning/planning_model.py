"""The cost model DHPStrategy plans with, resolved from what the user passed as ``cost_model``.

``None`` plans with the planner's default model; a :class:`CostModel` is used as it is; a path is loaded;
``"auto"`` calibrates a generic transformer on rank 0's device when the strategy is set up; ``"profile"``
times the user's own module on the first DataLoader's samples (it needs the data, so it waits for the first
loader). Rank 0 fits, every rank gets its model (the ranks must plan with the same one).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_dhp.lightning.collate import DHPPacking
from lightning_dhp.lightning.sampler import DHPBatchSampler
from lightning_dhp.planner import CostModel

if TYPE_CHECKING:
    from lightning_dhp.lightning.strategy import DHPStrategy

PROFILE = "profile"
CALIBRATE = "auto"


def resolve_at_setup(requested: CostModel | str | None, strategy: DHPStrategy) -> CostModel | None:
    """The planning model known once the model is on its device: ``None`` for the planner's default (and,
    with ``"profile"``, until :func:`profile` ran on the first loader)."""
    if requested == CALIBRATE:
        return _calibrate(strategy)
    if isinstance(requested, str) and requested != PROFILE:
        return CostModel.load(requested)
    return requested if isinstance(requested, CostModel) else None


def _calibrate(strategy: DHPStrategy) -> CostModel:
    """Fit the cost model on rank 0's device and share it."""
    from lightning_dhp.lightning.profiling import compute_dtype, transformer_step
    from lightning_dhp.planner.calibration import calibrate

    model = None
    if strategy.global_rank == 0:
        started = time.perf_counter()
        dtype = compute_dtype(strategy.precision_plugin.precision)
        model, report, _ = calibrate(transformer_step(device=str(strategy.root_device), dtype=dtype),
                                     base=CostModel.default())
        rank_zero_info(f"DHP: calibrated the cost model on {strategy.root_device} in {dtype} in "
                       f"{time.perf_counter() - started:.1f} s (fit error: median "
                       f"{report.median_abs_pct_error:.1f}%, p90 {report.p90_abs_pct_error:.1f}%)")
    return strategy.broadcast(model)


def profile(strategy: DHPStrategy, dataset: Any, batch_sampler: DHPBatchSampler, packing: DHPPacking,
            tokens_per_device: int) -> CostModel:
    """Time the user's module on packs of real samples (and, with vision patches, whole items with
    different patch counts), fit, and give every rank rank 0's model."""
    from lightning_dhp.lightning.module_profile import module_pack_runner, profiled_lengths, vision_items
    from lightning_dhp.lightning.profiling import fit_vision_term, profile_cost_model

    started = time.perf_counter()
    module = strategy.lightning_module
    lengths, patches = batch_sampler.lengths, batch_sampler.vision_patches
    run_pack, run_item = module_pack_runner(module, dataset, lengths, packing, strategy.root_device,
                                            strategy.batch_to_device, patches)
    base = CostModel.default()
    model, report = profile_cost_model(run_pack, profiled_lengths(lengths, tokens_per_device), base=base)
    if model.attention_s_per_token2 <= 0 and model.linear_s_per_token <= 0:
        rank_zero_warn("DHP: the profiled step times did not grow with the tokens (a model this small is all "
                       "per-step overhead); keeping the default model's per-token terms")
        model = dataclasses.replace(model, attention_s_per_token2=base.attention_s_per_token2,
                                    linear_s_per_token=base.linear_s_per_token)
    vision = ""
    chosen = vision_items(lengths, patches, tokens_per_device)
    if chosen:
        model, _ = fit_vision_term(model, run_item, [(index, lengths[index], patches[index]) for index in chosen])
        vision = f"; vision {model.vision_s_per_patch:.3g} s per patch from {len(chosen)} whole items"
    rank_zero_info(f"DHP: profiled the cost model of {type(module).__name__} in "
                   f"{time.perf_counter() - started:.1f} s ({report.summary()}{vision})")
    return strategy.broadcast(model)
