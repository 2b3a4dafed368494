"""``HFModule``: a Hugging Face causal LM or Qwen-VL model as a LightningModule that trains under DHP."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from transformers import PreTrainedModel

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.hf.attention import ATTENTION_NAME, LAYOUT_KWARG, SUPPORTED, check_routable
from lightning_dhp.hf.families import family_of
from lightning_dhp.hf.vision import VISION_KWARG, VISION_ROWS, install
from lightning_dhp.lightning import loss_share
from lightning_dhp.lightning.batch import batch_info
from lightning_dhp.lightning.collate import IGNORE_INDEX

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(parameters, lr=1e-5)``: a usual fine-tuning rate, PyTorch's other defaults."""
    return torch.optim.AdamW(parameters, lr=1e-5)


class HFModule(LightningModule):
    """Trains ``model`` (a ``*ForCausalLM`` or a multimodal model of a supported family) under ``DHPStrategy``.

    The model's text attention is switched to ``cp_attention`` (vision towers keep their own). Each
    step runs the model on this rank's rows of its group's packed samples and returns its share of
    the global token-mean cross-entropy, computed from the logits in the model's dtype (half
    precisions upcast to float32) against the labels DHP shifted before sharding. ``optimizer`` maps
    the trainable parameters to an optimizer (default :func:`default_optimizer`, AdamW at 1e-5).
    Give the data module :attr:`packing_options` (the item transform and token fields this model
    needs): ``DHPDataModule(dataset, lengths, batch_size, **module.packing_options)``.

    A multimodal group's vision work is spread over its ranks in independent units (images, tiles, video
    temporal patches or frames; see ``lightning_dhp/hf/families``); ``split_videos=False`` encodes every video
    whole on one rank, as a baseline to compare with.
    """

    def __init__(self, model: PreTrainedModel, optimizer: OptimizerFactory | None = None, *,
                 split_videos: bool = True) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = default_optimizer if optimizer is None else optimizer
        check_routable(model, model.config.get_text_config())
        self.family = family_of(model)
        if self.family is None and not type(model).__name__.endswith("ForCausalLM"):
            raise DHPConfigError(f"{type(model).__name__} is not a model HFModule can train; supported: {SUPPORTED}")
        model.set_attn_implementation({"text_config": ATTENTION_NAME} if self.family else ATTENTION_NAME)
        if self.family is not None:
            self.family.split_videos = split_videos
            install(model, self.family)

    @property
    def packing_options(self) -> dict[str, Any]:
        """``token_fields`` and ``item_transform`` for ``DHPDataModule`` / ``dhp_dataloader`` / ``DHPPacking``."""
        if self.family is not None:
            return {"token_fields": list(self.family.token_fields), "item_transform": self.family}
        return {"token_fields": [], "item_transform": None}

    def vision_patches(self, item: dict[str, Any]) -> int:
        """The patches the vision tower encodes for ``item`` (as the processor returns it; 0 for a text model):
        what ``DHPDataModule(..., vision_patches=[...])`` wants per item. Reads shapes only."""
        return 0 if self.family is None else self.family.vision_patches(item)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits ``(T_local, vocab)`` of this rank's rows (an idle rank's empty batch gives 0 rows)."""
        layout = batch_info(batch).layout
        if len(batch["input_ids"]) == 0:
            return self._idle_logits(batch)
        if self.family is None:
            return self.model(input_ids=batch["input_ids"][None], position_ids=batch["position_ids"][None],
                              use_cache=False).logits[0]
        multi_row = self.family.position_rows > 1
        if VISION_ROWS not in batch or (batch["position_ids"].dim() == 2) != multi_row:
            raise DHPConfigError(f"{type(self.model).__name__} needs its item transform and token fields: build the "
                                 "data module with DHPDataModule(..., **module.packing_options)")
        positions = batch["position_ids"].T[:, None] if multi_row else batch["position_ids"][None]
        return self.model(input_ids=batch["input_ids"][None], position_ids=positions, use_cache=False,
                          **{VISION_KWARG: (batch, layout)}).logits[0]

    def _idle_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """An idle rank runs the model on one dummy token (HF models cannot take 0 tokens) and keeps 0 rows
        of its logits, so the step still has a graph through the text model's parameters."""
        token = batch["input_ids"].new_zeros(1, 1)
        rows = 1 if self.family is None else self.family.position_rows
        positions = token if rows == 1 else token.expand(rows, 1, 1)
        logits = self.model(input_ids=token, position_ids=positions, use_cache=False,
                            **{LAYOUT_KWARG: ZigzagLayout([1], 1, 0)}).logits[0]
        return logits[:0] + 0 * logits.sum()

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """This rank's share of the global token-mean cross-entropy."""
        logits = self(batch)
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        loss_sum = F.cross_entropy(logits, batch["labels"].to(logits.device), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        return loss_share(loss_sum, batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.model.parameters() if p.requires_grad])
