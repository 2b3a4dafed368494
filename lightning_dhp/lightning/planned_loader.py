"""The DataLoader path of DHP: plan each global batch and collate this rank's rounds.

The sampler yields one request per global batch; the dataset wrapper plans it and loads only the
samples of this rank's groups. With ``num_workers > 0`` both happen in worker processes, so planning
and loading overlap the previous step's compute. Every rank plans the same batch with the same
inputs, so every rank holds the whole plan without any communication.
"""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.errors import DHPConfigError, DHPDataError, PlanError
from lightning_dhp.lightning import _lightning
from lightning_dhp.lightning.batch import RankRound
from lightning_dhp.lightning.collate import DHPPacking, count_loss_tokens
from lightning_dhp.lightning.sampler import DHPBatchSampler, check_one_length_per_item
from lightning_dhp.lightning.transfer import send_in_one_buffer
from lightning_dhp.lightning.workers import POLL_S, WatchedIterator, WorkerInit, default_context, new_stack_dir
from lightning_dhp.planner import CostModel, Plan, PlannerOptions, plan_batch, static_plan


@dataclass(frozen=True)
class PlanConfig:
    """Everything a rank needs to plan a global batch; identical on every rank but ``rank``."""

    num_devices: int
    rank: int
    tokens_per_device: int
    cost_model: CostModel | None = None
    node_size: int | None = None
    skip_bad_samples: bool = False
    static_degree: int | None = None  # plan like static ring CP: every group has this many ranks
    vision_patches_per_device: int | None = None
    planner_options: PlannerOptions | None = None  # None: the defaults

    def plan(self, lengths: Sequence[int], vision_patches: Sequence[int] | None = None) -> Plan:
        memory = {"vision_patches": vision_patches, "vision_patches_per_device": self.vision_patches_per_device}
        if self.static_degree is not None:
            return static_plan(lengths, self.num_devices, self.tokens_per_device, self.static_degree,
                               self.cost_model, **memory)
        return plan_batch(lengths, self.num_devices, self.tokens_per_device, self.cost_model,
                          node_size=self.node_size, options=self.planner_options, **memory)


@dataclass(frozen=True)
class StepRequest:
    loader_id: str  # which DHPDataLoader issued it, to track training progress per loader
    epoch: int
    position: int  # index of the global batch inside its epoch
    sample_ids: tuple[int, ...]  # dataset indices of the global batch


@send_in_one_buffer
class PlannedStep:
    """One global batch as seen by one rank: the whole plan and this rank's collated rounds.

    A plain class on purpose: Lightning's device transfer leaves it alone, and the strategy moves one
    round at a time to the device so that only one round's tensors are alive there. From a loader worker it
    comes with its tensors in one shared-memory buffer (:mod:`.transfer`). Each round's
    ``batch["dhp"]`` is a :class:`RankRound`; the strategy replaces it by the complete
    :class:`~lightning_dhp.lightning.batch.DHPBatchInfo` once the ranks agreed on the global counts.
    """

    def __init__(self, request: StepRequest, plan: Plan | None, rounds: list[dict[str, Any]],
                 leader_loss_tokens: int, leader_skipped: int, error: str | None,
                 planner_cpu_seconds: float, loader_failure: str | None = None) -> None:
        self.request = request
        self.plan = plan
        self.rounds = rounds
        self.leader_loss_tokens = leader_loss_tokens  # loss tokens of the groups this rank leads
        self.leader_skipped = leader_skipped  # bad samples dropped from those groups (skip_bad_samples=True)
        self.error = error  # a bad sample in this rank's groups; raised on every rank by the strategy
        self.planner_cpu_seconds = planner_cpu_seconds  # CPU time of planning this batch in its loader
        self.loader_failure = loader_failure  # this rank's loader worker stalled or died: no plan, no rounds

    @classmethod
    def failed(cls, request: StepRequest | None, loader_failure: str) -> PlannedStep:
        """The step handed over in place of a batch that never came; the strategy raises it on every rank."""
        return cls(request or StepRequest("", -1, -1, ()), None, [], 0, 0, None, 0.0, loader_failure)

    @property
    def failed_to_load(self) -> bool:
        return self.error is not None or self.loader_failure is not None

    @property
    def num_tokens(self) -> int:
        return sum(self.plan.lengths) if self.plan is not None else 0


class PlannedDataset(Dataset):
    """Maps a :class:`StepRequest` to this rank's :class:`PlannedStep`."""

    def __init__(self, dataset: Any, lengths: Sequence[int], config: PlanConfig, packing: DHPPacking,
                 vision_patches: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.lengths = lengths
        self.vision_patches = vision_patches
        self.config = config
        self.packing = packing

    def __getitem__(self, request: StepRequest) -> PlannedStep:
        config = self.config
        started = time.thread_time()  # the planner's own CPU, not the scheduler's: ranks share the cores
        patches = None if self.vision_patches is None else [self.vision_patches[i] for i in request.sample_ids]
        plan = config.plan([self.lengths[i] for i in request.sample_ids], patches)
        planner_cpu_seconds = time.thread_time() - started
        rounds: list[dict[str, Any]] = []
        leader_loss_tokens, leader_skipped, errors = 0, 0, []
        template: dict[str, Any] | None = None
        for round_index in range(len(plan.rounds)):
            group = plan.group_for(round_index, config.rank)
            skipped: list[int] = []
            items, kept = self._load(tuple(request.sample_ids[s] for s in group.samples), skipped, errors) \
                if group is not None else ([], ())
            batch = None
            if items:
                layout = ZigzagLayout([self.lengths[i] for i in kept], group.degree, group.ranks.index(config.rank))
                try:
                    batch, group_ranks = self.packing.collate_group(items, layout), group.ranks
                except DHPDataError as bad:  # e.g. media that became unreadable: raised on every rank
                    errors.append(str(bad))
            if batch is None:  # idle in this round, or its group failed to load
                template = template or self._template(request)
                batch, layout = self.packing.empty_batch(template)
                group_ranks = (config.rank,)
            loss_tokens = count_loss_tokens(items)
            if group is not None and config.rank == group.ranks[0]:  # counted once per group, by its first rank
                leader_loss_tokens += loss_tokens
                leader_skipped += len(skipped)
            batch["dhp"] = RankRound(layout=layout, group_ranks=group_ranks, sample_indices=kept,
                                     round_index=round_index, num_rounds=len(plan.rounds), loss_tokens=loss_tokens)
            rounds.append(batch)
        error = "\n".join(errors) if errors else None
        return PlannedStep(request, plan, rounds, leader_loss_tokens, leader_skipped, error, planner_cpu_seconds)

    def _template(self, request: StepRequest) -> dict[str, Any]:
        """The shortest trainable sample of the batch: its fields shape the empty batch of an idle round.

        Bad samples are passed over here (the ranks that train them report them), so a bad item never
        crashes an idle rank's loader.
        """
        for index in sorted(request.sample_ids, key=lambda i: self.lengths[i]):
            items, _ = self._load((index,), [], [])
            if items:
                return items[0]
        return {"input_ids": torch.zeros(0, dtype=torch.long)}

    def _load(self, sample_ids: tuple[int, ...], skipped: list[int],
              errors: list[str]) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
        items, kept = [], []
        for index in sample_ids:
            try:
                items.append(self.packing.load(self.dataset, index, self.lengths[index]))
                kept.append(index)
            except DHPDataError as bad:
                if self.config.skip_bad_samples:
                    skipped.append(index)
                else:
                    errors.append(f"{bad} (or pass skip_bad_samples=True to skip and count such samples)")
        return items, tuple(kept)

    def __len__(self) -> int:
        return len(self.lengths)


class StepRequests(Sampler[StepRequest]):
    """Wraps a :class:`DHPBatchSampler`: one :class:`StepRequest` per global batch."""

    def __init__(self, batch_sampler: DHPBatchSampler, loader_id: str) -> None:
        self.batch_sampler = batch_sampler
        self.loader_id = loader_id
        self.issued: list[StepRequest] = []  # this iteration's requests so far, in order

    def issued_request(self, index: int) -> StepRequest | None:
        """The ``index``-th request of the current iteration, if it was issued."""
        return self.issued[index] if index < len(self.issued) else None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[StepRequest]:
        self.issued = []
        start = self.batch_sampler.resume_position
        for offset, batch in enumerate(self.batch_sampler):
            self.issued.append(StepRequest(self.loader_id, self.batch_sampler.epoch, start + offset, tuple(batch)))
            yield self.issued[-1]


def dhp_batch_sampler_of(dataloader: Any) -> DHPBatchSampler:
    """The DataLoader's :class:`DHPBatchSampler`, or a clear error naming what to use instead."""
    batch_sampler = _lightning.unwrap_batch_sampler(getattr(dataloader, "batch_sampler", None))
    if not isinstance(batch_sampler, DHPBatchSampler):
        raise DHPConfigError(
            "DHPStrategy plans every global batch, so its DataLoaders need "
            "`batch_sampler=DHPBatchSampler(lengths, global_batch_size)` (or use DHPDataModule / "
            f"dhp_dataloader); got {type(batch_sampler).__name__}")
    return batch_sampler


def _unbatched(step: PlannedStep) -> PlannedStep:
    return step


def check_largest_samples_fit(lengths: Sequence[int], vision_patches: Sequence[int] | None, config: PlanConfig,
                              describe: Callable[[int], str] | None = None) -> None:
    """Fail when the loader is built, naming the dataset index (and what ``describe`` says of it, e.g. a manifest
    line), if the longest sample, or the one with the most vision patches, fits on no group."""
    largest = {max(range(len(lengths)), key=lambda i: lengths[i])}
    if vision_patches is not None:
        largest.add(max(range(len(lengths)), key=lambda i: vision_patches[i]))
    for index in sorted(largest):
        try:
            config.plan([lengths[index]], None if vision_patches is None else [vision_patches[index]])
        except PlanError as error:
            where = f" ({describe(index)})" if describe is not None else ""
            raise PlanError(f"dataset sample {index}{where} cannot be trained: {error}") from None


class DHPDataLoader(DataLoader):
    """A DataLoader of :class:`PlannedStep` objects for one rank. Built by the strategy.

    ``trained`` maps a loader id to the last request the strategy finished; the loader's state (saved
    in Lightning checkpoints) counts batches up to that one, not the ones already prefetched.

    With ``num_workers > 0`` the workers are persistent and start as :mod:`.workers` describes (a
    forkserver unless ``multiprocessing_context`` names another start method), and the wait for each batch
    is bounded by the DataLoader's ``timeout`` if set, else ``data_wait_timeout`` (``None``: unbounded): a
    batch that does not come, or a worker that died, becomes a failed step that the strategy raises on
    every rank.
    """

    def __init__(self, dataset: Any, batch_sampler: DHPBatchSampler, config: PlanConfig, packing: DHPPacking,
                 trained: dict[str, StepRequest], *, data_wait_timeout: float | None = None, **loader_kwargs: Any):
        check_one_length_per_item(dataset, batch_sampler.lengths)
        check_largest_samples_fit(batch_sampler.lengths, batch_sampler.vision_patches, config,
                                  getattr(dataset, "describe", None))
        self.dhp_batch_sampler = batch_sampler
        self.plan_config = config
        self.loader_id = uuid.uuid4().hex
        self._trained = trained
        self._start = (batch_sampler.epoch, batch_sampler.resume_position)
        self._stack_dir: str | None = None
        self._wait_s = loader_kwargs.get("timeout") or data_wait_timeout
        if loader_kwargs.get("num_workers", 0) > 0:
            self._stack_dir = new_stack_dir(self)
            loader_kwargs.update(
                worker_init_fn=WorkerInit(self._stack_dir, loader_kwargs.get("worker_init_fn")),
                multiprocessing_context=loader_kwargs.get("multiprocessing_context") or default_context(),
                persistent_workers=True, timeout=min(POLL_S, self._wait_s or POLL_S))
        super().__init__(PlannedDataset(dataset, batch_sampler.lengths, config, packing, batch_sampler.vision_patches),
                         sampler=StepRequests(batch_sampler, self.loader_id),
                         batch_size=None, collate_fn=_unbatched, **loader_kwargs)

    @classmethod
    def like(cls, dataloader: DataLoader, batch_sampler: DHPBatchSampler, config: PlanConfig, packing: DHPPacking,
             trained: dict[str, StepRequest], *, data_wait_timeout: float | None = None) -> DHPDataLoader:
        """A planned loader of ``dataloader``'s dataset with its worker settings."""
        loader_kwargs = {key: getattr(dataloader, key) for key in
                         ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                          "persistent_workers")}
        if dataloader.num_workers > 0:
            loader_kwargs["prefetch_factor"] = dataloader.prefetch_factor
        return cls(dataloader.dataset, batch_sampler, config, packing, trained, data_wait_timeout=data_wait_timeout,
                   **loader_kwargs)

    def __iter__(self) -> Iterator[PlannedStep]:
        try:
            iterator = super().__iter__()
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            if "pickle" not in str(error):
                raise
            context = self.multiprocessing_context
            raise DHPConfigError(
                f"the DataLoader's workers start with {context.get_start_method()!r}, which sends them the dataset, "
                f"item_transform and worker_init_fn pickled, and one of them cannot be pickled: {error}. Define them "
                "at module level (no lambdas, local functions or open handles), or pass multiprocessing_context="
                "'fork' to the DataLoader (which can deadlock a worker forked beside process-group threads)"
            ) from error
        if self._stack_dir is None:
            return iterator
        return WatchedIterator(iterator, rank=self.plan_config.rank, wait_s=self._wait_s, stack_dir=self._stack_dir,
                               request_of=self.sampler.issued_request, on_failure=PlannedStep.failed)

    def state_dict(self) -> dict[str, Any]:
        state = self.dhp_batch_sampler.state_dict()
        last = self._trained.get(self.loader_id)
        if last is not None:
            state.update(epoch=last.epoch, batches_consumed=last.position + 1)
        else:  # nothing trained since this loader started: prefetched batches do not count
            state.update(epoch=self._start[0], batches_consumed=self._start[1])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dhp_batch_sampler.load_state_dict(state)
        self._start = (state["epoch"], state["batches_consumed"])
