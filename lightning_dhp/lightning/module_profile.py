"""``DHPStrategy(cost_model="profile")``: time the user's own LightningModule on real samples.

A degree-1 pack of any lengths is cut from the dataset's longest trainable item (its per-token fields
truncated, its per-sample fields kept), collated exactly as a DHP step would be, and run through the
module's ``training_step`` and backward; what the step logs is dropped and the gradients are cleared.
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


def profiled_lengths(lengths: Sequence[int], tokens_per_device: int) -> list[int]:
    """Sample lengths spread from the data's short end to half the budget (pairs of them fit a device)."""
    cap = max(2, tokens_per_device // 2)
    usable = np.minimum(np.asarray(lengths), cap)
    chosen = np.quantile(usable, np.linspace(0.1, 1.0, PROFILED_LENGTHS)).round().astype(int)
    chosen = sorted({int(length) for length in chosen if length >= 1} | {cap // 4, cap})
    return [length for length in chosen if length >= 1]


def module_pack_runner(module: LightningModule, dataset: Any, lengths: Sequence[int], packing: DHPPacking,
                       device: torch.device, batch_to_device: Callable[[Any], Any]) -> Callable[[Sequence[int]], None]:
    """``run_pack(lengths)``: forward+backward of the module's training step on a degree-1 pack."""
    longest = int(np.argmax(lengths))
    template = packing.load(dataset, longest, int(lengths[longest]))
    token_fields = {"input_ids", "labels", *packing.token_fields}

    def cut(length: int) -> dict[str, Any]:
        if length > len(template["input_ids"]):
            raise DHPConfigError(f"cannot profile a sample of {length} tokens: the longest dataset item has "
                                 f"{len(template['input_ids'])}")
        return {key: value[:length] if key in token_fields else value for key, value in template.items()}

    def run_pack(pack: Sequence[int]) -> None:
        items = [cut(int(length)) for length in pack]
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

    return run_pack
