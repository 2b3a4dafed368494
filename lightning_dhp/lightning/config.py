"""DHPConfig: DHPStrategy's own options, checked once when they are given.

``DHPStrategy(**options)`` builds one from its keywords; ``DHPStrategy(config=DHPConfig(...))`` takes one
built elsewhere (e.g. shared by several runs). Lightning's own strategy arguments (``parallel_devices``,
``cluster_environment``, ``process_group_backend``, ``timeout``, ...) stay arguments of the strategy.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Collection, Mapping
from dataclasses import KW_ONLY, dataclass
from datetime import timedelta
from typing import Any

from torch import nn

from lightning_dhp.distributed.context import CP_IMPLEMENTATIONS
from lightning_dhp.errors import DHPConfigError, PlanError
from lightning_dhp.lightning.sharding import SHARDINGS, fsdp_unsupported_reason
from lightning_dhp.lightning.workers import DEFAULT_DATA_WAIT_S
from lightning_dhp.planner import CostModel, PlannerOptions, divisors

ModuleClasses = type[nn.Module] | str | Collection[type[nn.Module] | str]
START_METHODS = ("popen", "spawn", "fork", "forkserver")


@dataclass(frozen=True)
class DHPConfig:
    """What DHPStrategy plans and runs with; an option that cannot work is a :class:`DHPConfigError` here.

    Args:
        tokens_per_device: tokens one device holds in one micro-step (the memory budget). ``None``
            takes the longest sample of the training data, so every sample fits one device.
        cost_model: a :class:`CostModel`, a path to one saved as JSON, ``"profile"`` to time this
            LightningModule's own training step on packs of real samples before training and fit the
            model (the fit error is logged), ``"auto"`` to calibrate a generic transformer on the
            device, or ``None`` for the default model. Kept as given; the strategy's
            ``planning_cost_model`` is the model it resolves to (:mod:`.planning_model`).
        pool_size: most process groups kept alive between steps (least recently used are evicted).
        start_method: ``"popen"`` (Lightning's default script launcher) or ``"spawn"``.
        cp_implementation: ``"ring"`` (pass K/V around the group) or ``"allgather"``.
        group_free_ring: run rings with point-to-point ops on the world group instead of pooled groups.
        node_size: devices per node; groups that fit a node are not split across nodes. Defaults to the
            processes per node.
        skip_bad_samples: drop and count malformed dataset items instead of stopping the run.
        static_degree: plan every group with exactly this many ranks (Megatron-style static ring CP,
            data parallel over ``world_size / static_degree`` groups); 1 is plain data parallelism.
        activation_checkpointing: module classes whose instances recompute their activations in
            backward (Lightning FSDPStrategy's convention), inside the CP context of their forward.
            Import paths (``"package.module.Class"``, as configs write them) are resolved to classes here.
        sharding: ``"replicate"`` (every rank holds the whole model) or ``"fsdp"`` (FSDP2 over a 1-D mesh
            of all ranks; the LightningModule's direct children are the roots, so a step must call
            them, e.g. ``self.model(...)``). A ``configure_model`` that shards with ``self.device_mesh``
            itself is left as it is.
        fsdp_modules: with ``sharding="fsdp"``, module classes sharded on their own (e.g. decoder layers).
        save_distributed_checkpoint: with ``sharding="fsdp"``, checkpoints are folders of every rank's
            shards (``torch.distributed.checkpoint``, for models too large to gather) instead of one
            full file; both resume on any world size.
        gradient_bucket_mb: with ``sharding="replicate"``, gradients are summed in buckets of about this
            size, overlapped with the last round's backward; ``None`` sums them in one flat all-reduce
            after the backward.
        vision_patches_per_device: the most vision patches one device encodes in a step, on average over its
            group (the vision tower's activations, which ``tokens_per_device`` does not count); ``None`` leaves
            them unbudgeted. Needs the data's ``vision_patches``.
        data_wait_timeout: seconds a rank waits for a batch from its DataLoader workers (``num_workers > 0``)
            before every rank stops with a :class:`~lightning_dhp.errors.DHPLoaderError` naming the rank, the
            worker and its Python stack; ``None`` waits forever. A DataLoader's own ``timeout`` takes
            precedence. Keep it below the strategy's ``timeout`` (checked by :meth:`check_collective_timeout`),
            or the waiting peers' collective times out first.
        planner_options: the DHP planner's tuning constants, a :class:`~lightning_dhp.planner.PlannerOptions` or a
            mapping of some of its fields (e.g. ``{"rebalance": False}`` from a YAML config); ``None``: the defaults.
            Other values trade plan quality for planner time (``benchmarks/planner_ablation.py`` measures each).
    """

    tokens_per_device: int | None = None
    cost_model: CostModel | str | None = None
    pool_size: int = 32
    start_method: str = "popen"
    _: KW_ONLY
    cp_implementation: str = "ring"
    group_free_ring: bool = False
    node_size: int | None = None
    skip_bad_samples: bool = False
    static_degree: int | None = None
    activation_checkpointing: ModuleClasses | None = None
    sharding: str = "replicate"
    fsdp_modules: ModuleClasses | None = None
    save_distributed_checkpoint: bool = False
    gradient_bucket_mb: float | None = 25.0
    vision_patches_per_device: int | None = None
    data_wait_timeout: float | None = DEFAULT_DATA_WAIT_S
    planner_options: PlannerOptions | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.tokens_per_device is not None and self.tokens_per_device < 1:
            raise DHPConfigError(f"tokens_per_device must be >= 1, got {self.tokens_per_device}")
        if self.cp_implementation not in CP_IMPLEMENTATIONS:
            raise DHPConfigError(
                f"cp_implementation must be one of {CP_IMPLEMENTATIONS}, got {self.cp_implementation!r}")
        if self.group_free_ring and self.cp_implementation != "ring":
            raise DHPConfigError("group_free_ring=True needs cp_implementation='ring' (all-gather needs groups)")
        if self.start_method not in START_METHODS:
            raise DHPConfigError(
                f"start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got {self.start_method!r}")
        if self.static_degree is not None and self.static_degree < 1:
            raise DHPConfigError(f"static_degree must be >= 1, got {self.static_degree}")
        if self.sharding not in SHARDINGS:
            raise DHPConfigError(f"sharding must be one of {SHARDINGS}, got {self.sharding!r}")
        if self.sharding == "fsdp" and (reason := fsdp_unsupported_reason()) is not None:
            raise DHPConfigError(reason)
        if self.fsdp_modules and self.sharding != "fsdp":
            raise DHPConfigError("fsdp_modules needs sharding='fsdp'")
        if self.save_distributed_checkpoint and self.sharding != "fsdp":
            raise DHPConfigError("save_distributed_checkpoint needs sharding='fsdp' (replicas save one full file)")
        patches = self.vision_patches_per_device
        if patches is not None and (isinstance(patches, bool) or not isinstance(patches, int) or patches < 1):
            raise DHPConfigError(f"vision_patches_per_device must be a whole number >= 1 or None, got {patches!r}")
        if self.data_wait_timeout is not None and not self.data_wait_timeout > 0:
            raise DHPConfigError(f"data_wait_timeout must be a positive number of seconds or None, got "
                                 f"{self.data_wait_timeout!r}")
        object.__setattr__(self, "planner_options", _planner_options(self.planner_options))
        if self.planner_options is not None and self.static_degree is not None:
            raise DHPConfigError("planner_options tune the DHP planner, which static_degree does not use (it lays "
                                 "out groups of one degree); drop one of them")
        object.__setattr__(self, "activation_checkpointing", _classes(self.activation_checkpointing))
        object.__setattr__(self, "fsdp_modules", _classes(self.fsdp_modules))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options, in the order of the strategy's positional arguments."""
        return tuple(field.name for field in dataclasses.fields(cls))

    def check_collective_timeout(self, timeout: timedelta | None) -> None:
        """A rank waiting for its data must give up before its peers' collective does, or they stop
        without knowing why."""
        if self.data_wait_timeout is not None and timeout is not None \
                and self.data_wait_timeout >= timeout.total_seconds():
            raise DHPConfigError(
                f"data_wait_timeout={self.data_wait_timeout:g} s is not below the collective timeout "
                f"({timeout.total_seconds():g} s): the ranks waiting for a stalled one would time out first, "
                "without knowing why. Lower data_wait_timeout or raise timeout")

    def check_static_degree(self, world_size: int) -> None:
        """Static CP's groups of ``static_degree`` ranks must tile the world."""
        if self.static_degree is not None and world_size % self.static_degree:
            raise DHPConfigError(f"static_degree={self.static_degree} does not divide the {world_size} devices; use "
                                 f"one of {divisors(world_size)} (or DHP, static_degree=None, which takes any degree)")

    @property
    def gradient_bucket_bytes(self) -> int | None:
        return None if self.gradient_bucket_mb is None else int(self.gradient_bucket_mb * 2**20)


def _planner_options(options: PlannerOptions | Mapping[str, Any] | None) -> PlannerOptions | None:
    """The planner options as :class:`PlannerOptions` (a mapping, as configs write them, converted)."""
    if options is None or isinstance(options, PlannerOptions):
        return options
    if not isinstance(options, Mapping):
        raise DHPConfigError(f"planner_options must be a PlannerOptions, a mapping of its fields or None, got "
                             f"{type(options).__name__}")
    try:
        return PlannerOptions.from_mapping(options)
    except PlanError as bad:
        raise DHPConfigError(f"planner_options: {bad}") from None


def _classes(classes: ModuleClasses | None) -> tuple[type[nn.Module], ...]:
    """Module classes given as classes or import paths ("package.module.Class")."""
    if isinstance(classes, (type, str)):
        classes = [classes]
    resolved = []
    for entry in classes or ():
        if isinstance(entry, str):
            module_name, _, class_name = entry.rpartition(".")
            try:
                entry = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError, ValueError) as error:
                raise DHPConfigError(f"cannot import the module class {entry!r}: {error}") from None
        resolved.append(entry)
    return tuple(resolved)
