"""A tiny causal LM (RoPE, GQA, attention through cp_attention) and its data, for strategy tests.

``TinyLM.reference_loss`` is the oracle: every sample on its own, dense causal attention in plain
PyTorch, no packing, no planner, no context parallelism.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from lightning_dhp import cp_attention, loss_share

VOCAB, HIDDEN, HEADS, KV_HEADS = 32, 16, 4, 2


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=x.dtype) / half))
    angles = positions.to(x.dtype)[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class Block(nn.Module):
    """Attention (through ``attention``, by default cp_attention) and an MLP, both residual."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * self.head_dim)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, attention=cp_attention) -> torch.Tensor:
        sizes = [HEADS * self.head_dim, KV_HEADS * self.head_dim, KV_HEADS * self.head_dim]
        q, k, v = self.qkv(x).split(sizes, -1)
        q = rope(q.view(-1, HEADS, self.head_dim), position_ids)
        k = rope(k.view(-1, KV_HEADS, self.head_dim), position_ids)
        v = v.view(-1, KV_HEADS, self.head_dim)
        x = x + self.out(attention(q, k, v).reshape(-1, HIDDEN))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """``checkpoint``: None, "reentrant" or "non-reentrant" (the block runs under torch's checkpoint)."""

    def __init__(self, checkpoint: str | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.block = Block()
        self.lm_head = nn.Linear(HIDDEN, VOCAB)
        self.checkpoint = checkpoint

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention=cp_attention) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.checkpoint is None:
            x = self.block(x, position_ids, attention)
        else:
            x = torch.utils.checkpoint.checkpoint(self.block, x, position_ids, attention,
                                                  use_reentrant=self.checkpoint == "reentrant")
        return self.lm_head(x)

    def reference_loss(self, samples: list[torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss over all samples, each run alone with dense causal attention."""
        total, count = 0.0, 0
        for tokens in samples:
            logits = self(tokens, torch.arange(len(tokens)), attention=dense_causal_attention)
            total = total + F.cross_entropy(logits[:-1], tokens[1:], reduction="sum")
            count += len(tokens) - 1
        return total / count


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    mask = torch.ones(len(q), len(k), dtype=torch.bool).tril()
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences of the given lengths (deterministic per seed)."""

    def __init__(self, lengths: list[int], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.lengths = lengths
        self.samples = [torch.randint(0, VOCAB, (length,), generator=generator) for length in lengths]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.samples[index]}


class LMTask(LightningModule):
    """Logs the loss share of every step (train, validate, test) as a user would: ``self.log(name, share)``."""

    def __init__(self, lr: float = 0.1, checkpoint: str | None = None, lr_gamma: float | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyLM(checkpoint).to(dtype)
        self.lr = lr
        self.lr_gamma = lr_gamma  # if set, the learning rate is multiplied by it after every step

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self.model(batch["input_ids"], batch["position_ids"])
        loss_sum = F.cross_entropy(logits, batch["labels"], ignore_index=-100, reduction="sum")
        return loss_share(loss_sum, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"logits": self.model(batch["input_ids"], batch["position_ids"]),
                "length": [len(batch["input_ids"])] * len(batch["dhp"].sample_indices)}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.lr_gamma is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TwoOptimizerTask(LMTask):
    """Lightning's two-optimizer pattern under DHP (manual optimization): a critic learns the next token from
    the LM's detached logits. In every round each optimizer's loss is computed and backwarded with that
    optimizer toggled; in the last round both step, together (``in_turn=False``) or the LM first, before
    the critic's backward (``in_turn=True``)."""

    def __init__(self, in_turn: bool = False) -> None:
        super().__init__()
        self.critic = nn.Linear(VOCAB, VOCAB).to(torch.float64)
        self.automatic_optimization = False
        self.in_turn = in_turn

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lm_optimizer, critic_optimizer = self.optimizers()
        last_round = batch["dhp"].is_last_round
        with self.toggled_optimizer(lm_optimizer):
            logits = self.model(batch["input_ids"], batch["position_ids"])
            lm_loss = loss_share(F.cross_entropy(logits, batch["labels"], reduction="sum"), batch)
            self.manual_backward(lm_loss)
        if last_round and self.in_turn:
            lm_optimizer.step()
            lm_optimizer.zero_grad()
        with self.toggled_optimizer(critic_optimizer):
            critic_logits = self.critic(logits.detach())
            critic_loss = loss_share(F.cross_entropy(critic_logits, batch["labels"], reduction="sum"), batch)
            self.manual_backward(critic_loss)
        if last_round:
            for optimizer in (critic_optimizer,) if self.in_turn else (lm_optimizer, critic_optimizer):
                optimizer.step()
                optimizer.zero_grad()
        return lm_loss

    def configure_optimizers(self) -> Any:
        return (torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9),
                torch.optim.SGD(self.critic.parameters(), lr=self.lr, momentum=0.9))


class TwoBackwardsTask(LMTask):
    """Manual optimization that backwards each round's loss in two parts (the first keeping the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = self.loss(batch)
        self.manual_backward(0.25 * loss, retain_graph=True)
        self.manual_backward(0.75 * loss)
        if batch["dhp"].is_last_round:
            optimizer.step()
            optimizer.zero_grad()
        return loss


class MixedPrecisionTask(LMTask):
    """float32 weights, for ``precision="bf16-mixed"``; records whether each training step ran under
    bf16 autocast (Lightning's precision plugin wraps the step in it)."""

    def __init__(self) -> None:
        super().__init__(dtype=torch.float32)
        self.steps_under_bf16_autocast: list[bool] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.steps_under_bf16_autocast.append(
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return super().training_step(batch, batch_idx)


def reference_training(lengths: list[int], batches: list[list[int]], steps: int, lr: float = 0.1, *,
                       accumulate: int = 1, clip: float | None = None, losses: list | None = None,
                       lr_gamma: float | None = None, precision: str = "64-true") -> dict:
    """Plain PyTorch: the same model, optimizer and global batches, one process, no Lightning.

    Each optimizer step averages the mean losses of ``accumulate`` consecutive global batches, as
    Lightning's ``accumulate_grad_batches`` does; ``clip`` clips the gradient norm before stepping.
    ``losses`` (if given) receives each global batch's mean loss, before its update. ``precision`` is
    "64-true" or "bf16-mixed" (float32 weights, the loss computed under CPU bf16 autocast).
    """
    mixed = {"64-true": False, "bf16-mixed": True}[precision]
    task = LMTask(lr, lr_gamma=lr_gamma, dtype=torch.float32 if mixed else torch.float64)
    data = TokenDataset(lengths)
    configured = task.configure_optimizers()
    optimizer = configured if lr_gamma is None else configured["optimizer"]
    for step in range(steps):
        optimizer.zero_grad()
        for batch in batches[step * accumulate:(step + 1) * accumulate]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
                loss = task.model.reference_loss([data.samples[i] for i in batch])
            (loss / accumulate).backward()
            if losses is not None:
                losses.append(loss.item())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(task.model.parameters(), clip)
        optimizer.step()
        if lr_gamma is not None:
            configured["lr_scheduler"]["scheduler"].step()
    return {name: value.detach().clone() for name, value in task.model.state_dict().items()}


def reference_mean_loss(params: dict, lengths: list[int], batches: list[list[int]], seed: int) -> float:
    """The mean over global batches of each batch's mean loss, weighted by batch size (Lightning's epoch mean)."""
    task = LMTask()
    task.model.load_state_dict(params)
    samples = TokenDataset(lengths, seed=seed).samples
    with torch.no_grad():
        total = sum(task.model.reference_loss([samples[i] for i in batch]).item() * len(batch) for batch in batches)
    return total / sum(len(batch) for batch in batches)


def reference_two_optimizers(lengths: list[int], batches: list[list[int]], steps: int) -> dict:
    """:class:`TwoOptimizerTask` in plain PyTorch on the same global batches: both losses are means over the
    whole global batch, each backwarded on its own, then both optimizers step. Parameters named as in the task,
    without the ``model.`` prefix."""
    task = TwoOptimizerTask()
    samples = TokenDataset(lengths).samples
    lm_optimizer, critic_optimizer = task.configure_optimizers()
    for batch in batches[:steps]:
        tokens = [samples[i] for i in batch]
        count = sum(len(sample) - 1 for sample in tokens)
        logits = [task.model(sample, torch.arange(len(sample)), dense_causal_attention) for sample in tokens]
        lm_loss = sum(F.cross_entropy(x[:-1], t[1:], reduction="sum") for x, t in zip(logits, tokens, strict=True))
        (lm_loss / count).backward()
        critic_loss = sum(F.cross_entropy(task.critic(x.detach())[:-1], t[1:], reduction="sum")
                          for x, t in zip(logits, tokens, strict=True))
        (critic_loss / count).backward()
        for optimizer in (lm_optimizer, critic_optimizer):
            optimizer.step()
            optimizer.zero_grad()
    return {name.removeprefix("model."): value.detach().clone() for name, value in task.state_dict().items()}
