"""DHPStrategy: Lightning's DDP strategy, with every global batch planned onto varying CP groups.

What changes against DDP, hook by hook:
- ``process_dataloader``: a DataLoader with a :class:`DHPBatchSampler` becomes a
  :class:`DHPDataLoader` that plans each global batch and collates this rank's rounds.
- ``configure_ddp``: the model is not wrapped; ranks run different shapes, so gradients are summed
  explicitly, once per optimizer step (``optimizer_step``), before clipping.
- ``training_step`` / ``validation_step``: agree on the plan (one small all-gather), take the plan's
  groups from the pool in lockstep, then run the user's step once per round inside the round's CP
  context. Every rank runs every round (an idle rank gets an empty batch), so the user's logging
  stays collective-safe.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer

from lightning_dhp.distributed import CPContext, cp_context, require_cp_context
from lightning_dhp.distributed.pool import GroupPool
from lightning_dhp.lightning.collate import DHPDataError
from lightning_dhp.lightning.planned_loader import DHPDataLoader, PlanConfig, PlannedStep, StepRequest
from lightning_dhp.lightning.sampler import DHPBatchSampler
from lightning_dhp.planner import CostModel, Plan


class DHPConfigError(ValueError):
    """DHPStrategy used in a way it cannot work; the message says what to change."""


class DHPPlanMismatchError(RuntimeError):
    """Ranks hold different plans for the same step (different data, lengths or planner inputs)."""


_PLAN_HISTORY = 64  # plans kept for plots and summaries
_PEER_FAILURE = re.compile(r"closed by peer|reset by peer|timed out|timeout|Broken pipe|NCCL|HCCL", re.IGNORECASE)


class DHPStrategy(DDPStrategy):
    """Dynamic Hybrid Parallelism: per-batch context-parallel groups of any size.

    Args:
        tokens_per_device: tokens one device holds in one micro-step (the memory budget). ``None``
            takes the longest sample of the training data, so every sample fits one device.
        cost_model: a :class:`CostModel`, a path to one saved as JSON, ``"auto"`` to calibrate on the
            device at setup, or ``None`` for the default model.
        pool_size: most process groups kept alive between steps (least recently used are evicted).
        start_method: ``"popen"`` (Lightning's default script launcher) or ``"spawn"``.
        cp_implementation: ``"ring"`` (pass K/V around the group) or ``"allgather"``.
        group_free_ring: run rings with point-to-point ops on the world group instead of pooled groups.
        node_size: devices per node; groups that fit a node are not split across nodes. Defaults to the
            processes per node.
        skip_bad_samples: drop and count malformed dataset items instead of stopping the run.
        static_degree: plan every group with exactly this many ranks (Megatron-style static ring CP,
            data parallel over ``world_size / static_degree`` groups); 1 is plain data parallelism.
        **ddp_kwargs: DDPStrategy arguments (``timeout``, ``process_group_backend``, ``accelerator`` ...).
    """

    strategy_name = "dhp"

    def __init__(self, tokens_per_device: int | None = None, cost_model: CostModel | str | None = None,
                 pool_size: int = 32, start_method: str = "popen", *, cp_implementation: str = "ring",
                 group_free_ring: bool = False, node_size: int | None = None, skip_bad_samples: bool = False,
                 static_degree: int | None = None, **ddp_kwargs: Any) -> None:
        super().__init__(start_method=start_method, **ddp_kwargs)
        if self._ddp_kwargs:
            raise DHPConfigError(
                f"DHPStrategy does not wrap the model in DistributedDataParallel, so {sorted(self._ddp_kwargs)} "
                "would be ignored; remove them")
        if tokens_per_device is not None and tokens_per_device < 1:
            raise DHPConfigError(f"tokens_per_device must be >= 1, got {tokens_per_device}")
        if cp_implementation not in ("ring", "allgather"):
            raise DHPConfigError(f"cp_implementation must be 'ring' or 'allgather', got {cp_implementation!r}")
        if group_free_ring and cp_implementation != "ring":
            raise DHPConfigError("group_free_ring=True needs cp_implementation='ring' (all-gather needs groups)")
        self.tokens_per_device = tokens_per_device
        self.cost_model = cost_model
        self.cp_implementation = cp_implementation
        self.group_free_ring = group_free_ring
        self.node_size = node_size
        self.skip_bad_samples = skip_bad_samples
        self.static_degree = static_degree
        self.pool = GroupPool(pool_size)
        self.plan_history: list[dict[str, Any]] = []
        self.skipped_samples = 0
        self._trained: dict[str, StepRequest] = {}
        self._step_started: float | None = None
        self._last_step: PlannedStep | None = None
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self._scopes = ExitStack()
        self._early_grads: list[torch.Tensor | None] | None = None
        self._in_early_backward = False
        self._current_request: StepRequest | None = None

    # -- environment -------------------------------------------------------------------------------

    @property
    def is_multi_process(self) -> bool:
        return self.num_nodes * self.num_processes > 1

    def setup_distributed(self) -> None:
        if self.is_multi_process:
            super().setup_distributed()
        else:  # one device: no process group at all
            self.set_world_ranks()

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is None and self.root_device.type == "npu":
            return "hccl"
        return super()._get_process_group_backend()

    def setup(self, trainer: Any) -> None:
        # Batches are split by the planner, never by Lightning's DistributedSampler.
        trainer._accelerator_connector.use_distributed_sampler = False
        if not self.is_multi_process:  # DDPStrategy.setup would broadcast through a process group we lack
            Strategy.setup(self, trainer)
        else:
            super().setup(trainer)
            # outside a planned step, attention has no layout to follow
            self._scopes.enter_context(require_cp_context(
                "cp_attention was called outside a DHP batch on a multi-device run; call it from "
                "training_step/validation_step, which DHPStrategy runs inside the batch's context-parallel group"))
        if self.cost_model == "auto":
            self.cost_model = self._calibrate()
        elif isinstance(self.cost_model, str):
            self.cost_model = CostModel.load(self.cost_model)

    def _calibrate(self) -> CostModel:
        """Fit the cost model on rank 0's device and share it: every rank must plan with the same model."""
        from lightning_dhp.planner.calibration import calibrate, transformer_step

        model = None
        if self.global_rank == 0:
            started = time.perf_counter()
            model, report, _ = calibrate(transformer_step(device=str(self.root_device)), base=CostModel.default())
            rank_zero_info(f"DHP: calibrated the cost model on {self.root_device} in "
                           f"{time.perf_counter() - started:.1f} s (fit error: median "
                           f"{report.median_abs_pct_error:.1f}%, p90 {report.p90_abs_pct_error:.1f}%)")
        return self.broadcast(model) if self.is_multi_process else model

    def configure_ddp(self) -> None:
        if self.is_multi_process:
            _sync_module_states(self.model)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # never wrapped in DistributedDataParallel: gradients are summed in optimizer_step

    def on_exception(self, exception: BaseException) -> None:
        """Say which step a failed collective belongs to and what it usually means."""
        super().on_exception(exception)
        message = str(exception)
        if self._current_request is not None and _PEER_FAILURE.search(message):
            request = self._current_request
            exception.args = (
                f"DHP: a peer rank died or stalled during global batch {request.position} (epoch {request.epoch}); "
                f"rank {self.global_rank} stopped when a collective failed or passed the timeout ({self._timeout}). "
                f"The first error is in the other ranks' logs. Original error: {message}",)

    def teardown(self) -> None:
        self._scopes.close()
        self.pool.clear()
        super().teardown()

    # -- data --------------------------------------------------------------------------------------

    def process_dataloader(self, dataloader: object) -> object:
        if isinstance(dataloader, DHPDataLoader) or dataloader == []:  # [] is Lightning's "no loader"
            return dataloader
        batch_sampler = getattr(dataloader, "batch_sampler", None)
        if not isinstance(batch_sampler, DHPBatchSampler):
            raise DHPConfigError(
                "DHPStrategy plans every global batch, so its DataLoaders need "
                "`batch_sampler=DHPBatchSampler(lengths, global_batch_size)` (or use DHPDataModule); got "
                f"{type(batch_sampler).__name__}")
        if self.static_degree is not None and self.world_size % self.static_degree:
            divisors = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
            raise DHPConfigError(f"static_degree={self.static_degree} does not divide the {self.world_size} devices; "
                                 f"use one of {divisors} (or DHP, static_degree=None, which takes any degree)")
        config = PlanConfig(
            num_devices=self.world_size, rank=self.global_rank,
            tokens_per_device=self.tokens_per_device or max(batch_sampler.lengths),
            cost_model=self.cost_model if isinstance(self.cost_model, CostModel) else None,
            node_size=self.node_size or (self.num_processes if self.num_nodes > 1 else None),
            skip_bad_samples=self.skip_bad_samples, static_degree=self.static_degree)
        loader_kwargs = {key: getattr(dataloader, key) for key in
                         ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                          "persistent_workers")}
        if dataloader.num_workers > 0:
            loader_kwargs["prefetch_factor"] = dataloader.prefetch_factor
        return DHPDataLoader(dataloader.dataset, batch_sampler, config, self._trained, **loader_kwargs)

    # -- steps -------------------------------------------------------------------------------------

    def training_step(self, step: PlannedStep, batch_idx: int) -> Any:
        self._begin_step(step)
        accumulation = self.lightning_module.trainer.accumulate_grad_batches
        earlier_rounds = torch.zeros((), device=self.root_device)
        last_round = len(step.plan.rounds) - 1
        for round_index in range(last_round + 1):
            output = self._run_round(step, round_index, super().training_step, batch_idx)
            if round_index < last_round:
                # Backward now, so only one round's activations are alive; Lightning runs the last one.
                loss = _loss_of(output)
                self._backward_early_round(loss / accumulation)
                earlier_rounds = earlier_rounds + loss.detach()
        step_loss = _loss_of(output) + earlier_rounds  # the whole share's value, the last round's graph
        self._log_step(step, step_loss.detach())
        self._trained[step.request.loader_id] = step.request
        return _with_loss(output, step_loss)

    def _backward_early_round(self, loss: torch.Tensor) -> None:
        """Backward of a round before the last, into gradients kept aside.

        Lightning zeroes gradients between the training step and the backward it runs, so early rounds'
        gradients wait in ``_early_grads`` and join in ``post_backward`` of the last round.
        """
        params = self._trainable_parameters()
        outer = [p.grad for p in params]
        for p, early in zip(params, self._early_grads or [None] * len(params), strict=True):
            p.grad = early
        self._in_early_backward = True
        try:
            self.backward(loss, None)
        finally:
            self._in_early_backward = False
        self._early_grads = [p.grad for p in params]
        for p, grad in zip(params, outer, strict=True):
            p.grad = grad

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        if self._in_early_backward or self._early_grads is None:
            return
        for p, early in zip(self._trainable_parameters(), self._early_grads, strict=True):
            if early is not None:
                p.grad = early if p.grad is None else p.grad.add_(early)
        self._early_grads = None

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.lightning_module.parameters() if p.requires_grad]

    def validation_step(self, step: PlannedStep, batch_idx: int, *args: Any) -> Any:
        self._begin_step(step, training=False)
        user_step = super().validation_step
        outputs = [self._run_round(step, round_index, user_step, batch_idx, *args)
                   for round_index in range(len(step.plan.rounds))]
        return outputs[-1]

    def _run_round(self, step: PlannedStep, round_index: int, user_step: Callable[..., Any], *args: Any) -> Any:
        batch = step.rounds[round_index]
        info = batch.pop("dhp")
        batch = self.batch_to_device(batch)
        batch["dhp"] = info
        info.global_loss_tokens = self._global_loss_tokens
        context = CPContext(layout=info.layout, group=self._group_of(info.group_ranks),
                            ranks=info.group_ranks, implementation=self.cp_implementation)
        with cp_context(context):
            output = user_step(batch, *args)
        step.rounds[round_index] = None  # free the round's tensors before the next one
        return self._tie_to_parameters(output)

    def _group_of(self, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        if len(ranks) == 1:
            return None
        if self.group_free_ring:
            return dist.group.WORLD
        return self._groups[ranks]

    def _tie_to_parameters(self, output: Any) -> Any:
        """An empty round's loss has no graph; give it one so Lightning's backward works everywhere."""
        loss = _loss_of(output)
        if loss is None or loss.requires_grad or not torch.is_grad_enabled():
            return output
        zero = sum(p.reshape(-1)[:1].sum() for p in self._trainable_parameters()) * 0.0
        return _with_loss(output, loss + zero)

    # -- agreement, groups, metrics ----------------------------------------------------------------

    def _begin_step(self, step: PlannedStep, training: bool = True) -> None:
        """Agree on the plan and on bad data, count loss tokens, and take the plan's groups."""
        self._current_request = step.request
        now = time.perf_counter()
        if training and self._last_step is not None and self._step_started is not None:
            self._record(self._last_step, now - self._step_started)
        self._step_started, self._last_step = now, step if training else None
        report = torch.tensor([step.leader_loss_tokens, step.error is not None, _digest_number(step.plan),
                               step.leader_skipped], dtype=torch.int64, device=self.root_device)
        reports = self._all_gather_reports(report)
        if reports[:, 1].any():
            ranks_by_error: dict[str, list[int]] = {}
            for rank, errors in enumerate(self._all_gather_objects(step.error)):
                for error in (errors or "").splitlines():
                    ranks_by_error.setdefault(error, []).append(rank)
            raise DHPDataError(f"bad samples in global batch {step.request.position} of epoch {step.request.epoch}:\n"
                               + "\n".join(f"[ranks {ranks}] {error}" for error, ranks in ranks_by_error.items()))
        digests = reports[:, 2]
        if (digests != digests[0]).any():
            differing = [rank for rank in range(len(digests)) if digests[rank] != digests[0]]
            raise DHPPlanMismatchError(
                f"ranks disagree on the plan of global batch {step.request.position} (epoch {step.request.epoch}): "
                f"ranks {differing} differ from rank 0. Every rank must see the same dataset lengths, sampler "
                "seed, tokens_per_device and cost model")
        self._global_loss_tokens = int(reports[:, 0].sum())
        if training:
            self.skipped_samples += int(reports[:, 3].sum())
        if self.is_multi_process and not self.group_free_ring:
            self._groups = self.pool.acquire_plan(group.ranks for round_ in step.plan.rounds for group in round_.groups)

    def _all_gather_reports(self, report: torch.Tensor) -> torch.Tensor:
        if not self.is_multi_process:
            return report.unsqueeze(0).cpu()
        gathered = [torch.empty_like(report) for _ in range(self.world_size)]
        dist.all_gather(gathered, report)
        return torch.stack(gathered).cpu()

    def _all_gather_objects(self, value: Any) -> list[Any]:
        if not self.is_multi_process:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def _log_step(self, step: PlannedStep, step_loss: torch.Tensor) -> None:
        global_loss = self.reduce(step_loss.clone(), reduce_op="sum") if self.is_multi_process else step_loss
        stats = step.plan.stats()
        metrics = {
            "dhp/rounds": float(len(step.plan.rounds)),
            "dhp/groups": float(stats["num_groups"]),
            "dhp/max_degree": float(stats["max_degree"]),
            "dhp/mean_degree": float(stats["mean_degree"]),
            "dhp/predicted_step_s": float(step.plan.predicted_time),
            "dhp/planner_ms": step.planner_seconds * 1e3,
            "dhp/pool_hits": float(self.pool.stats.hits),
            "dhp/pool_misses": float(self.pool.stats.misses),
            "dhp/pool_groups": float(len(self.pool)),
            "dhp/skipped_samples": float(self.skipped_samples),
        }
        if self.plan_history and "measured_s" in self.plan_history[-1]:
            previous = self.plan_history[-1]
            metrics["dhp/step_s"] = previous["measured_s"]
            metrics["dhp/tokens_per_s"] = previous["tokens"] / previous["measured_s"]
        self.lightning_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False,
                                       batch_size=len(step.request.sample_ids))
        self.lightning_module.log("dhp/loss", global_loss, on_step=True, on_epoch=False, prog_bar=True,
                                  batch_size=len(step.request.sample_ids))

    def _record(self, step: PlannedStep, measured_seconds: float) -> None:
        entry = {"plan": step.plan, "measured_s": measured_seconds, "tokens": step.num_tokens,
                 "planner_s": step.planner_seconds, "position": step.request.position, "epoch": step.request.epoch}
        self.plan_history.append(entry)
        del self.plan_history[:-_PLAN_HISTORY]

    # -- gradients ---------------------------------------------------------------------------------

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        def closure_then_sum_gradients() -> Any:
            result = closure()
            self.sum_gradients(optimizer)
            return result

        return super().optimizer_step(optimizer, closure_then_sum_gradients, model, **kwargs)

    def sum_gradients(self, optimizer: Optimizer) -> None:
        """Sum every parameter's gradient over the world, one flat all-reduce per dtype and device.

        A rank whose rounds never touched a parameter contributes zeros, so all ranks launch identical
        collectives.
        """
        if not self.is_multi_process:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()



def _loss_of(output: Any) -> torch.Tensor | None:
    if isinstance(output, dict):
        return output.get("loss")
    return output


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, dict):
        return {**output, "loss": loss}
    return loss


def _digest_number(plan: Plan) -> int:
    return int(plan.digest()[:15], 16)

