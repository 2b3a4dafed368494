"""The LightningModule that trains :class:`TinyVLM` on video digits, plus single-process helpers.

``VLMTask`` expects DHP batches (``batch["dhp"]``, see ``lightning_dhp.lightning.collate``): its
training step returns this rank's share of the global mean answer loss. ``answer_accuracy`` and
``fit_single_process`` run one process at degree 1 without Lightning: the app measures accuracy
before and after fine-tuning with the first and pretrains the starting checkpoint with the second.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch.utils.data import Dataset

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.distributed.context import CPContext, cp_context
from lightning_dhp.lightning.batch import DHPBatchInfo, loss_share
from lightning_dhp.lightning.collate import IGNORE_INDEX, DHPPacking, count_loss_tokens
from lightning_dhp.models.tiny_vlm import TinyVLM, TinyVLMConfig


def model_logits(model: TinyVLM, batch: Mapping[str, Any]) -> torch.Tensor:
    """Logits of the rows of one DHP batch (inside the batch's CP context)."""
    return model(
        batch["input_ids"],
        batch["position_ids"],
        batch["visual_index"],
        batch["dhp"].layout.sequence_ids,
        batch["pixel_values"],
    )


class VLMTask(LightningModule):
    """Answer questions about videos: next-token loss on the answer tokens, AdamW.

    ``config`` is a :class:`TinyVLMConfig` or a mapping of its fields (as Hydra passes it);
    ``init_checkpoint`` names a file holding a ``TinyVLM`` state dict to start from (the pretrained model).
    """

    def __init__(
        self,
        config: TinyVLMConfig | Mapping[str, Any] | None = None,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        init_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        config = config if isinstance(config, TinyVLMConfig) else TinyVLMConfig(**(config or {}))
        self.save_hyperparameters(
            {
                "config": vars(config),
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": tuple(betas),
                "warmup_steps": warmup_steps,
                "init_checkpoint": init_checkpoint,
            }
        )
        self.model = TinyVLM(config)
        if init_checkpoint is not None:
            if not os.path.isfile(init_checkpoint):
                raise FileNotFoundError(
                    f"init_checkpoint {init_checkpoint!r} does not exist; run the pretraining stage that "
                    "writes it, fix the path, or pass init_checkpoint=None to start from random weights"
                )
            self.model.load_state_dict(torch.load(init_checkpoint, map_location="cpu", weights_only=True))
        self._validation_totals: torch.Tensor | None = None

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return model_logits(self.model, batch)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        return loss_share(F.cross_entropy(logits, batch["labels"], ignore_index=IGNORE_INDEX, reduction="sum"), batch)

    def on_validation_epoch_start(self) -> None:
        self._validation_totals = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """Accumulate this rank's summed loss, loss tokens and correct answer tokens; return the loss share."""
        logits = self(batch)
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        labelled = labels != IGNORE_INDEX
        correct = (logits.argmax(-1) == labels)[labelled].sum()
        self._validation_totals += torch.stack([loss_sum.detach(), labelled.sum(), correct]).double()
        return loss_share(loss_sum, batch)

    def on_validation_epoch_end(self) -> None:
        """Log the exact token mean loss and answer accuracy over every rank and round."""
        loss_sum, tokens, correct = self.trainer.strategy.reduce(self._validation_totals, reduce_op="sum")
        tokens = tokens.clamp(min=1)
        self.log("val/loss", loss_sum / tokens, sync_dist=True)
        self.log("val/answer_accuracy", correct / tokens, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (weight decay only on weight matrices) with a linear warmup over ``warmup_steps``."""
        decay = [p for name, p in self.model.named_parameters() if p.dim() >= 2 and "embed" not in name]
        no_decay = [p for name, p in self.model.named_parameters() if p.dim() < 2 or "embed" in name]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        warmup_steps = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def answer_accuracy(self, dataset: Dataset, indices: Sequence[int] | None = None, **kwargs: Any) -> float:
        """See :func:`answer_accuracy`."""
        return answer_accuracy(self.model, dataset, indices, **kwargs)


def single_process_batch(
    items: Sequence[dict[str, Any]], sample_indices: Sequence[int], global_loss_tokens: int | None = None
) -> dict[str, Any]:
    """A degree-1 DHP batch of ``items`` (one group holding every sample), as the strategy would build it."""
    layout = ZigzagLayout([len(item["input_ids"]) for item in items], 1, 0)
    batch = DHPPacking(VideoDigits.token_fields).collate_group(items, layout)
    loss_tokens = count_loss_tokens(items)
    batch["dhp"] = DHPBatchInfo(
        layout=layout,
        group_ranks=(0,),
        sample_indices=tuple(sample_indices),
        round_index=0,
        num_rounds=1,
        loss_tokens=loss_tokens,
        global_loss_tokens=loss_tokens if global_loss_tokens is None else global_loss_tokens,
        global_samples=len(items),
    )
    return batch


def token_budget_chunks(lengths: Sequence[int], indices: Sequence[int], max_tokens: int) -> Iterator[list[int]]:
    """Consecutive runs of ``indices`` whose lengths sum to at most ``max_tokens`` (a longer sample runs alone)."""
    chunk: list[int] = []
    chunk_tokens = 0
    for index in indices:
        if chunk and chunk_tokens + lengths[index] > max_tokens:
            yield chunk
            chunk, chunk_tokens = [], 0
        chunk.append(index)
        chunk_tokens += int(lengths[index])
    if chunk:
        yield chunk


@torch.no_grad()
def answer_accuracy(
    model: TinyVLM, dataset: Dataset, indices: Sequence[int] | None = None, *, max_tokens: int = 8192
) -> float:
    """Fraction of samples whose answer tokens all come out right under teacher forcing (greedy argmax).

    Runs in this process at degree 1, ``max_tokens`` packed tokens per forward.
    """
    indices = range(len(dataset)) if indices is None else indices
    if len(indices) == 0:
        raise ValueError("answer_accuracy needs at least one sample index; pass a non-empty held-out set")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for chunk in token_budget_chunks(dataset.lengths, indices, max_tokens):
            batch = single_process_batch([dataset[index] for index in chunk], chunk)
            layout = batch["dhp"].layout
            with cp_context(CPContext(layout, None, (0,))):
                predictions = model_logits(model, batch).argmax(-1)
            labels = batch["labels"]
            wrong = (predictions != labels) & (labels != IGNORE_INDEX)
            wrong_per_sample = torch.zeros(len(chunk), dtype=torch.long).index_add_(
                0, layout.sequence_ids, wrong.long()
            )
            correct += int((wrong_per_sample == 0).sum())
    finally:
        model.train(was_training)
    return correct / len(indices)


def fit_single_process(
    task: VLMTask, dataset: Dataset, steps: int, samples_per_step: int, *, seed: int = 0
) -> list[float]:
    """Train ``task`` in this process at degree 1 on random batches; return the loss of every step.

    The plain loop behind the pretraining stage and the tests: no Lightning trainer, no process group.
    """
    optimization = task.configure_optimizers()
    optimizer, scheduler = optimization["optimizer"], optimization["lr_scheduler"]["scheduler"]
    rng = np.random.default_rng(seed)
    losses = []
    task.train()
    for _ in range(steps):
        chosen = rng.choice(len(dataset), size=samples_per_step, replace=False).tolist()
        batch = single_process_batch([dataset[index] for index in chosen], chosen)
        with cp_context(CPContext(batch["dhp"].layout, None, (0,))):
            loss = task.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses
