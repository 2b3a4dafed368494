"""One planned global batch under DHPStrategy: agree, run the rounds, skip or sum, publish.

Every rank runs each step the same way and makes the same collective calls in the same order:

1. **Agree** (:meth:`StepRunner.begin`): one small all-gather of each rank's loss tokens, load failure, plan
   digest and skipped samples. A bad sample or a stalled loader anywhere stops every rank; a rank with
   another plan stops every rank. The counts of the global batch complete each round's
   :class:`~lightning_dhp.lightning.batch.DHPBatchInfo`; the plan's groups come from the pool.
2. **Rounds** (:meth:`StepRunner.enter_round`): one round's batch on the device, the user's step run
   inside the round's context-parallel context, which stays current until the round's backward ran
   (every rank runs every round: an idle rank gets an empty batch). In automatic optimization, early
   rounds backward at once, so only one round's activations are alive.
3. **None/skip**: a step returns ``None`` on every rank in every round (the global batch is skipped: no
   backward, no optimizer change) or on none; a partial None is an error on every rank. Ranks check
   after each early round (before a backward that may communicate) and once at the end.
4. **Publish**: ranks check they logged the same names; the logged shares are summed over rounds and
   ranks and handed to Lightning once (:mod:`.shares`).

A :class:`StepState` holds everything of one step; it lives until the next step begins, so a failed
collective after the step (e.g. the last round's backward) can still name its global batch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from lightning_dhp.distributed import CPContext, cp_context
from lightning_dhp.distributed.pool import GroupPool
from lightning_dhp.errors import DHPConfigError, DHPDataError, DHPLoaderError, DHPRankMismatchError
from lightning_dhp.lightning.batch import DHPBatchInfo, loss_of
from lightning_dhp.lightning.config import DHPConfig
from lightning_dhp.lightning.gradients import GradientSync
from lightning_dhp.lightning.planned_loader import PlannedStep
from lightning_dhp.lightning.predictions import assemble, piece_of
from lightning_dhp.lightning.sharding import ShardedGradientSync
from lightning_dhp.lightning.shares import LoggedShares

_PEER_FAILURE = re.compile(r"closed by peer|reset by peer|timed out|timeout|Broken pipe|NCCL|HCCL", re.IGNORECASE)


@dataclass(frozen=True)
class World:
    """The collectives of a step over every rank; on one process they return this rank's value alone."""

    size: int
    device: torch.device
    multi_process: bool

    def gather_numbers(self, *numbers: int) -> torch.Tensor:
        """Every rank's ``numbers`` as int64, one row per rank, on the CPU."""
        tensor = torch.tensor(numbers, dtype=torch.int64, device=self.device)
        if not self.multi_process:
            return tensor.unsqueeze(0).cpu()
        gathered = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(gathered, tensor)
        return torch.stack(gathered).cpu()

    def gather_objects(self, value: Any) -> list[Any]:
        if not self.multi_process:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values


@dataclass
class StepState:
    """One global batch on this rank, from :meth:`StepRunner.begin` until the next step begins."""

    step: PlannedStep
    global_loss_tokens: int = 0  # labelled tokens of the whole global batch, over all ranks and rounds
    global_samples: int = 0  # its samples, bad ones skipped (skip_bad_samples=True) left out
    skipped_samples: int = 0  # bad samples dropped from it
    groups: dict[tuple[int, ...], dist.ProcessGroup] = field(default_factory=dict)  # the plan's, from the pool
    round: DHPBatchInfo | None = None  # the round running now, until its backward ran
    round_scope: ExitStack = field(default_factory=ExitStack)  # that round's CP context
    skipping: bool = False  # every rank returned None: the step trains nothing

    @property
    def where(self) -> str:
        return f"global batch {self.step.request.position} (epoch {self.step.request.epoch})"


class StepRunner:
    """Runs DHPStrategy's planned steps. ``world`` and ``gradients`` are set when the strategy is set up."""

    def __init__(self, pool: GroupPool, config: DHPConfig, to_device: Callable[[Any], Any]) -> None:
        self.pool = pool
        self.config = config
        self.to_device = to_device
        self.world = World(1, torch.device("cpu"), False)
        self.gradients: GradientSync | ShardedGradientSync | None = None
        self.logged = LoggedShares()
        self.state: StepState | None = None  # the current (or last) step

    def train(self, step: PlannedStep, module: LightningModule, run_step: Callable[[dict[str, Any]], Any],
              backward: Callable[[torch.Tensor], Any]) -> Any:
        """Run ``run_step`` (the user's training_step) once per round; the loss of the whole share (the
        earlier rounds' values, the last round's graph), or Lightning's skip when every rank returned None."""
        automatic = module.automatic_optimization
        state = self.begin(step, training=True)
        gradients = self.gradients
        assert gradients is not None
        num_rounds = len(step.plan.rounds)
        returned_none, earlier_losses, output = 0, [], None
        with self.logged.capture(module):
            for round_index in range(num_rounds):
                output = run_step(self.enter_round(round_index))
                loss = loss_of(output)
                returned_none += loss is None
                if round_index == num_rounds - 1:
                    continue
                if automatic and self.world.multi_process:  # the backward below may communicate: agree first
                    self._check_none(state, self.world.gather_numbers(int(loss is None))[:, 0], 1)
                if loss is None:
                    continue
                earlier_losses.append(loss.detach())
                if automatic:  # backward now, so only one round's activations are alive
                    with gradients.early_backward():
                        backward(loss / module.trainer.accumulate_grad_batches)
        if not automatic:  # the user's backwards ran in the step: the last round is over
            self.close_round()
        every_rank_returned = self._finish(state, returned_none, strict=automatic)
        if every_rank_returned:
            step_loss = sum(earlier_losses, loss_of(output))
            self.logged.add("dhp/loss", step_loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self._publish(module, state)
        if every_rank_returned:
            return {**output, "loss": step_loss} if isinstance(output, dict) else step_loss
        if automatic:
            # Lightning's skip, which it refuses on several processes: no backward, gradients stay as they
            # are (None after zero_grad), so the optimizer leaves every parameter and its state alone.
            gradients.discard()
            state.skipping = True
            return torch.zeros((), device=self.world.device)
        return None

    def evaluate(self, step: PlannedStep, module: LightningModule, run_step: Callable[[dict[str, Any]], Any]) -> Any:
        """Run a validation or test step once per round; the last round's output."""
        state = self.begin(step, training=False)
        output = None
        with self.logged.capture(module):
            for round_index in range(len(step.plan.rounds)):
                output = run_step(self.enter_round(round_index))
        self.close_round()
        self._finish(state, returned_none=0, strict=False)
        self._publish(module, state)
        return output

    def predict(self, step: PlannedStep, run_step: Callable[[dict[str, Any]], Any]) -> list[Any]:
        """One output per sample of the global batch, in the batch's order, the same on every rank."""
        self.begin(step, training=False)
        pieces = []
        for round_index in range(len(step.plan.rounds)):
            batch = self.enter_round(round_index)
            pieces.append(piece_of(batch["dhp"], run_step(batch)))
        self.close_round()
        gathered = self.world.gather_objects([piece for piece in pieces if piece is not None])
        return assemble([piece for rank_pieces in gathered for piece in rank_pieces], step.request.sample_ids)

    def begin(self, step: PlannedStep, training: bool) -> StepState:
        """Agree on the plan and on bad data, count the global batch, and take the plan's groups."""
        self.close_round()
        self.state = state = StepState(step)  # before the first collective, which may fail naming this step
        digest = int(step.plan.digest()[:15], 16) if step.plan is not None else 0
        reports = self.world.gather_numbers(step.leader_loss_tokens, step.failed_to_load, digest,
                                            step.leader_skipped)
        if reports[:, 1].any():
            self._raise_load_failures(step)
        digests = reports[:, 2]
        if (digests != digests[0]).any():
            differing = [rank for rank in range(len(digests)) if digests[rank] != digests[0]]
            raise DHPRankMismatchError(
                f"ranks disagree on the plan of {state.where}: ranks {differing} differ from rank 0. Every rank "
                "must see the same dataset lengths, sampler seed, tokens_per_device and cost model")
        skipped = int(reports[:, 3].sum())
        state.global_loss_tokens = int(reports[:, 0].sum())
        state.global_samples = len(step.request.sample_ids) - skipped
        if training:
            state.skipped_samples = skipped
            assert self.gradients is not None
            self.gradients.new_step()
        if self.world.multi_process and not self.config.group_free_ring:
            state.groups = self.pool.acquire_plan(group.ranks for round_ in step.plan.rounds for group in round_.groups)
        return state

    def _raise_load_failures(self, step: PlannedStep) -> None:
        """Every rank raises the same error: a stopped loader anywhere, or every rank's bad samples."""
        failures = self.world.gather_objects((step.error, step.loader_failure))
        stopped_loaders = [loader_failure for _, loader_failure in failures if loader_failure]
        if stopped_loaders:
            raise DHPLoaderError("a DataLoader worker stopped delivering batches, so no rank can go on:\n"
                                 + "\n".join(stopped_loaders))
        ranks_by_error: dict[str, list[int]] = {}
        for rank, (errors, _) in enumerate(failures):
            for error in (errors or "").splitlines():
                ranks_by_error.setdefault(error, []).append(rank)
        raise DHPDataError(f"bad samples in global batch {step.request.position} of epoch {step.request.epoch}:\n"
                           + "\n".join(f"[ranks {ranks}] {error}" for error, ranks in ranks_by_error.items()))

    def enter_round(self, round_index: int) -> dict[str, Any]:
        """This round's batch on the device with its complete ``batch["dhp"]``, its CP context current until
        the round's backward ran."""
        state = self.state
        assert state is not None
        self.close_round()
        rounds = state.step.rounds
        batch, rounds[round_index] = rounds[round_index], None  # free each round after use
        info = batch.pop("dhp").complete(state.global_loss_tokens, state.global_samples)
        batch = self.to_device(batch)
        batch["dhp"] = info
        state.round_scope.enter_context(cp_context(CPContext(
            layout=info.layout, group=self._group_of(state, info.group_ranks), ranks=info.group_ranks,
            implementation=self.config.cp_implementation)))
        state.round = info
        return batch

    @contextmanager
    def round_backward(self, automatic: bool) -> Iterator[bool]:
        """Around a backward in the current round; yields whether autograd should run (not in a skipped
        step). Early rounds keep their gradients aside; the last round's backward ends with the sum over
        ranks, and under automatic optimization (one backward per round) it ends the round."""
        state, gradients = self.state, self.gradients
        assert state is not None and state.round is not None and gradients is not None
        last_round = state.round.is_last_round
        gradients.before_backward(last_round)
        yield not state.skipping
        if last_round:
            gradients.finish_backward(only_if_any=state.skipping)
            if automatic:
                self.close_round()

    @contextmanager
    def gradient_sum_deferred(self) -> Iterator[None]:
        """No sum over ranks in this block (Lightning accumulating gradients over global batches)."""
        gradients = self.gradients
        assert gradients is not None
        enabled, gradients.enabled = gradients.enabled, False
        try:
            yield
        finally:
            gradients.enabled = enabled

    def check_optimizer_step(self) -> None:
        """Refuse an optimizer step before the last round: the gradients are not summed yet."""
        round_ = self.state.round if self.state is not None else None
        if round_ is not None and not round_.is_last_round:
            raise DHPConfigError(
                f"the optimizer stepped in round {round_.round_index + 1} of {round_.num_rounds} of a global batch. "
                "Under DHP manual optimization runs training_step once per round: call self.manual_backward(loss) "
                "in every round and step (and zero_grad) only when batch['dhp'].is_last_round")

    def close(self) -> None:
        """At the run's end: no round open, the gradient hooks removed."""
        self.close_round()
        if isinstance(self.gradients, GradientSync):
            self.gradients.close()

    def close_round(self) -> None:
        if self.state is not None:
            self.state.round_scope.close()
            self.state.round = None

    def _group_of(self, state: StepState, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        if len(ranks) == 1:
            return None
        if self.config.group_free_ring:
            return dist.group.WORLD
        return state.groups[ranks]

    def _finish(self, state: StepState, returned_none: int, strict: bool) -> bool:
        """Check that ranks logged the same names and (``strict``: automatic optimization) agree on None;
        True if every round of every rank returned a value."""
        headers = self.world.gather_numbers(returned_none, self.logged.digest())
        if (headers[:, 1] != headers[0, 1]).any():
            raise DHPRankMismatchError(
                f"ranks logged different values in {state.where}: inside a DHP step every rank must make the same "
                "self.log calls in every round (an idle rank runs your step on an empty batch: log there too)")
        if strict:
            self._check_none(state, headers[:, 0], len(state.step.plan.rounds))
        return int(headers[:, 0].sum()) == 0

    def _check_none(self, state: StepState, nones_by_rank: torch.Tensor, rounds: int) -> None:
        """None must come from every rank in every round, or from none: a partial None cannot skip a
        global batch consistently (and would leave a peer waiting in a ring's backward)."""
        total = int(nones_by_rank.sum())
        if 0 < total < self.world.size * rounds:
            ranks = [rank for rank in range(len(nones_by_rank)) if nones_by_rank[rank]]
            raise DHPRankMismatchError(
                f"training_step returned None on ranks {ranks} in {state.where} but a loss elsewhere. Under DHP each "
                "rank runs your step once per round on part of the global batch (an empty batch where it is idle); "
                "return None in every round on every rank to skip the whole global batch, or return a loss (e.g. "
                "loss_share of a zero sum)")

    def _publish(self, module: LightningModule, state: StepState) -> None:
        if self.world.multi_process and len(self.logged):
            self.logged.sum_over_ranks(dist.all_reduce, self.world.device)
        self.logged.publish(module, global_batch_size=state.global_samples)

    def explain_peer_failure(self, exception: BaseException, rank: int, timeout: timedelta | None) -> None:
        """Say which step a failed collective belongs to and what it usually means."""
        message = str(exception)
        if self.state is None or not _PEER_FAILURE.search(message):
            return
        exception.args = (
            f"DHP: a peer rank died or stalled during {self.state.where}; "
            f"rank {rank} stopped when a collective failed or passed the timeout ({timeout}). "
            "The first error is in the other ranks' logs. If no rank failed, check that every rank makes "
            "the same collective calls in every round: the same number of backward calls (those of the last "
            "round sum gradients over ranks) and, under sharding='fsdp', the same sharded-module calls (a "
            "sharded module called on some ranks only, e.g. only where a rank holds images, waits forever). "
            f"Original error: {message}",)
