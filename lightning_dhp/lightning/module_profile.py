"""``DHPStrategy(cost_model="profile")``: time the user's own LightningModule on real samples.

A degree-1 pack of any lengths is cut from the dataset's longest trainable item (its per-token fields
truncated, its per-sample fields kept; the longest item without vision patches when the data has both),
collated exactly as a DHP step would be, and run through the module's ``training_step`` and backward;
what the step logs is dropped and the gradients are cleared. With vision patches, whole items with
different patch counts are also timed alone (:func:`vision_items`) to fit the vision tower's term.
Every rank profiles at once (a sharded model gathers its parameters on every rank), so every rank fits
its own model and the strategy keeps rank 0's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.distributed import CPContext, cp_context
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning.batch import DHPBatchInfo, loss_of
from lightning_dhp.lightning.collate import DHPPacking, count_loss_tokens
from lightning_dhp.lightning.profiling import synchronize
from lightning_dhp.lightning.shares import LoggedShares

PROFILED_LENGTHS = 5  # distinct sample lengths, spread over the data; profile_packs makes ~13 packs of them
PROFILED_VISION_ITEMS = 4  # whole items with vision patches, spread over their patch counts


def profiled_lengths(lengths: Sequence[int], tokens_per_device: int) -> list[int]:
    """Sample lengths spread from the data's short end to half the budget (pairs of them fit a device)."""
    cap = max(2, tokens_per_device // 2)
    usable = np.minimum(np.asarray(lengths), cap)
    chosen = np.quantile(usable, np.linspace(0.1, 1.0, PROFILED_LENGTHS)).round().astype(int)
    chosen = sorted({int(length) for length in chosen if length >= 1} | {cap // 4, cap})
    return [length for length in chosen if length >= 1]


def vision_items(lengths: Sequence[int], vision_patches: Sequence[int] | None, tokens_per_device: int) -> list[int]:
    """Dataset indices of whole items to time for the vision term: up to :data:`PROFILED_VISION_ITEMS` with
    patches that fit one device, spread from the fewest patches to the most."""
    if vision_patches is None:
        return []
    candidates = sorted((patches, index) for index, patches in enumerate(vision_patches)
                        if patches > 0 and lengths[index] <= tokens_per_device)
    if not candidates:
        return []
    positions = np.linspace(0, len(candidates) - 1, PROFILED_VISION_ITEMS).round().astype(int)
    return sorted({candidates[position][1] for position in positions})


def module_pack_runner(module: LightningModule, dataset: Any, lengths: Sequence[int], packing: DHPPacking,
                       device: torch.device, batch_to_device: Callable[[Any], Any],
                       vision_patches: Sequence[int] | None = None) -> tuple[Callable[[Sequence[int]], None],
                                                                             Callable[[int], None]]:
    """``run_pack(lengths)``: forward+backward of the module's training step on a degree-1 pack cut from
    one item; ``run_item(index)``: the same on dataset item ``index`` alone, whole."""
    text_only = [i for i in range(len(lengths)) if vision_patches is not None and vision_patches[i] == 0]
    template_index = max(text_only or range(len(lengths)), key=lambda i: lengths[i])
    template = packing.load(dataset, template_index, int(lengths[template_index]))
    token_fields = {"input_ids", "labels", *packing.token_fields}

    def cut(length: int) -> dict[str, Any]:
        if length > len(template["input_ids"]):
            raise DHPConfigError(f"cannot profile a sample of {length} tokens: the longest dataset item has "
                                 f"{len(template['input_ids'])}")
        return {key: value[:length] if key in token_fields else value for key, value in template.items()}

    def run_pack(pack: Sequence[int]) -> None:
        run_items([cut(int(length)) for length in pack])

    def run_item(index: int) -> None:
        run_items([packing.load(dataset, index, int(lengths[index]))])

    def run_items(items: list[dict[str, Any]]) -> None:
        pack = [len(item["input_ids"]) for item in items]
        layout = ZigzagLayout(list(pack), 1, 0)
        batch = batch_to_device(packing.collate_group(items, layout))
        loss_tokens = count_loss_tokens(items)
        batch["dhp"] = DHPBatchInfo(layout, (0,), tuple(range(len(items))), 0, 1, loss_tokens,
                                    global_loss_tokens=loss_tokens, global_samples=len(items))
        with cp_context(CPContext(layout, None, (0,))), LoggedShares().capture(module):
            output = module.training_step(batch, 0)
        loss = loss_of(output)
        if loss is None or not loss.requires_grad:
            raise DHPConfigError("cost_model='profile' times training_step plus backward, but training_step "
                                 "returned no loss with a graph; pass a CostModel (e.g. CostModel.for_transformer)")
        loss.backward()
        module.zero_grad(set_to_none=True)
        synchronize(device)

    return run_pack, run_item
