"""What a LightningModule sees of its DHP micro-step (``batch["dhp"]``), and shares of the global batch.

Under DHP one global batch runs as several rounds on every rank, each rank holding a part of it.
A *share* is a rank's local sum divided by a count of the whole global batch, so summing shares over
rounds and ranks gives the global mean: gradients of loss shares sum to the single-device gradient,
and the strategy sums logged shares before Lightning sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.errors import DHPConfigError

ShareCount = Literal["loss_tokens", "samples"]


@dataclass(frozen=True)
class RankRound:
    """What the loader knows of this rank's part of one round: its layout and group, which samples,
    which round of how many. The strategy completes it into a :class:`DHPBatchInfo` once the ranks
    have agreed on the global batch's counts (:meth:`complete`)."""

    layout: ZigzagLayout
    group_ranks: tuple[int, ...]
    sample_indices: tuple[int, ...]  # dataset indices of the group's samples, in packing order
    round_index: int
    num_rounds: int
    loss_tokens: int  # labelled tokens of this group (all its ranks together)

    @property
    def degree(self) -> int:
        return len(self.group_ranks)

    @property
    def is_last_round(self) -> bool:
        """The round after which gradients are summed and the optimizer may step."""
        return self.round_index == self.num_rounds - 1

    def complete(self, global_loss_tokens: int, global_samples: int) -> DHPBatchInfo:
        return DHPBatchInfo(**{field.name: getattr(self, field.name) for field in fields(RankRound)},
                            global_loss_tokens=global_loss_tokens, global_samples=global_samples)


@dataclass(frozen=True)
class DHPBatchInfo(RankRound):
    """``batch["dhp"]``: this rank's micro-step, and the counts of the whole global batch over all ranks
    and rounds (the denominators of :func:`global_share`)."""

    global_loss_tokens: int
    global_samples: int


def loss_of(output: Any) -> torch.Tensor | None:
    """The loss a step returned: the output itself, or its ``"loss"`` entry (Lightning's two forms)."""
    if isinstance(output, dict):
        return output.get("loss")
    return output


def batch_info(batch: Any) -> DHPBatchInfo:
    """``batch["dhp"]``, or a clear error when the batch was not planned by DHPStrategy."""
    info = batch.get("dhp") if isinstance(batch, dict) else None
    if not isinstance(info, DHPBatchInfo):
        raise DHPConfigError(
            "this batch was not planned by DHPStrategy (it has no batch['dhp']); shares of the global batch "
            "exist only under Trainer(strategy=DHPStrategy(...)) or strategy='dhp'. Under another strategy "
            "divide by your own batch's count instead")
    return info


def global_share(local_sum: torch.Tensor, batch: dict[str, Any], per: ShareCount = "loss_tokens") -> torch.Tensor:
    """This rank's share of a global mean: ``local_sum`` over the whole global batch's count.

    ``per="loss_tokens"`` divides by the labelled tokens of the global batch (a token-mean loss or
    token accuracy), ``per="samples"`` by its samples (a per-sample mean; sum each sample's value on
    one rank of its group only, e.g. where ``batch["dhp"].layout.rank == 0``).
    """
    info = batch_info(batch)
    if per == "loss_tokens":
        count = info.global_loss_tokens
    elif per == "samples":
        count = info.global_samples
    else:
        raise DHPConfigError(f"global_share: per must be 'loss_tokens' or 'samples', got {per!r}")
    return local_sum / max(count, 1)


def loss_share(loss_sum: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """This rank's share of the global token-mean loss: its summed token loss over the global batch's
    loss tokens. Return it from ``training_step``; log it with ``self.log`` to log the global loss."""
    return global_share(loss_sum, batch, "loss_tokens")
