"""DHPStrategy: every global batch planned onto context-parallel groups whose sizes change per batch.

A :class:`~lightning.pytorch.strategies.ParallelStrategy` (like Lightning's ModelParallelStrategy):
the model is never wrapped, ranks run different shapes. What each hook adds:

- ``process_dataloader``: a DataLoader with a :class:`DHPBatchSampler` becomes a :class:`DHPDataLoader`
  that plans each global batch and collates this rank's rounds.
- ``training_step`` / ``validation_step`` / ``test_step`` / ``predict_step``: agree on the plan (one
  small all-gather), take the plan's groups from the pool, run the user's step once per round inside
  the round's CP context (every rank runs every round: an idle rank gets an empty batch), then sum
  what the step logged over rounds and ranks (:mod:`~lightning_dhp.lightning.shares`).
- ``backward`` / ``block_backward_sync``: gradients of early rounds kept aside, one sum over the world
  after the last round's backward (:mod:`~lightning_dhp.lightning.gradients`).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dhp.distributed import CPContext, cp_context, require_cp_context
from lightning_dhp.distributed.checkpointing import apply_activation_checkpointing
from lightning_dhp.distributed.context import CP_IMPLEMENTATIONS
from lightning_dhp.distributed.pool import GroupPool
from lightning_dhp.distributed.world import world_device_id
from lightning_dhp.errors import DHPConfigError, DHPDataError, DHPLoaderError, DHPRankMismatchError
from lightning_dhp.lightning import _lightning, sharding
from lightning_dhp.lightning.batch import DHPBatchInfo, loss_of
from lightning_dhp.lightning.collate import DHPPacking
from lightning_dhp.lightning.gradients import GradientSync
from lightning_dhp.lightning.materialize import check_materializable, has_meta_tensors, materialize
from lightning_dhp.lightning.npu import NPUAccelerator, npu_precision
from lightning_dhp.lightning.planned_loader import DHPDataLoader, PlanConfig, PlannedStep, StepRequest
from lightning_dhp.lightning.predictions import assemble, piece_of
from lightning_dhp.lightning.sampler import DHPBatchSampler
from lightning_dhp.lightning.sharding import (
    SHARDINGS,
    ShardedGradientSync,
    blocks_to_shard,
    fsdp_unsupported_reason,
    is_sharded,
    mixed_precision_policy,
    shard_model,
)
from lightning_dhp.lightning.shares import ALREADY_SUMMED, LoggedShares
from lightning_dhp.lightning.workers import DEFAULT_DATA_WAIT_S, refuse_training_script_rerun_in_a_worker
from lightning_dhp.planner import CostModel, Plan, divisors

ModuleClasses = type[nn.Module] | str | Collection[type[nn.Module] | str]
# DHPBatchSampler never drops predict samples (predict loaders keep the last short batch), which
# Lightning cannot check on a custom batch sampler and warns about.
warnings.filterwarnings("ignore", message="You are using a custom batch sampler `DHPBatchSampler` for prediction")
# The strategy hands prediction writers each step's indices itself (predict_step).
warnings.filterwarnings("ignore",
                        message="Couldn't infer the batch indices fetched from your dataloader: `DHPDataLoader`")
_REMOVED_ATTRIBUTES = {
    "plan_history": "each step's plan, timings and tokens are in the DHPPlanReport callback's `history`: "
                    "Trainer(callbacks=[DHPPlanReport()]), then report.history (lightning_dhp.lightning.DHPPlanReport)",
}
_PEER_FAILURE = re.compile(r"closed by peer|reset by peer|timed out|timeout|Broken pipe|NCCL|HCCL", re.IGNORECASE)


class DHPStrategy(ParallelStrategy):
    """Dynamic Hybrid Parallelism: per-batch context-parallel groups of any size.

    Args:
        tokens_per_device: tokens one device holds in one micro-step (the memory budget). ``None``
            takes the longest sample of the training data, so every sample fits one device.
        cost_model: a :class:`CostModel`, a path to one saved as JSON, ``"profile"`` to time this
            LightningModule's own training step on packs of real samples before training and fit the
            model (the fit error is logged), ``"auto"`` to calibrate a generic transformer on the
            device, or ``None`` for the default model.
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
            precedence. Keep it below ``timeout``, or the waiting peers' collective times out first.
        process_group_backend, timeout: as for Lightning's DDPStrategy; ``timeout`` bounds every
            collective, so a stalled rank stops the others with the step named.
    """

    strategy_name = "dhp"

    def __init__(self, tokens_per_device: int | None = None, cost_model: CostModel | str | None = None,
                 pool_size: int = 32, start_method: str = "popen", *, cp_implementation: str = "ring",
                 group_free_ring: bool = False, node_size: int | None = None, skip_bad_samples: bool = False,
                 static_degree: int | None = None,
                 activation_checkpointing: ModuleClasses | None = None,
                 sharding: str = "replicate", fsdp_modules: ModuleClasses | None = None,
                 save_distributed_checkpoint: bool = False, gradient_bucket_mb: float | None = 25.0,
                 vision_patches_per_device: int | None = None, data_wait_timeout: float | None = DEFAULT_DATA_WAIT_S,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout,
                 **parallel_kwargs: Any) -> None:
        super().__init__(**parallel_kwargs)
        if tokens_per_device is not None and tokens_per_device < 1:
            raise DHPConfigError(f"tokens_per_device must be >= 1, got {tokens_per_device}")
        if cp_implementation not in CP_IMPLEMENTATIONS:
            raise DHPConfigError(f"cp_implementation must be one of {CP_IMPLEMENTATIONS}, got {cp_implementation!r}")
        if group_free_ring and cp_implementation != "ring":
            raise DHPConfigError("group_free_ring=True needs cp_implementation='ring' (all-gather needs groups)")
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise DHPConfigError(f"start_method must be 'popen', 'spawn', 'fork' or 'forkserver', got {start_method!r}")
        if static_degree is not None and static_degree < 1:
            raise DHPConfigError(f"static_degree must be >= 1, got {static_degree}")
        if sharding not in SHARDINGS:
            raise DHPConfigError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
        if sharding == "fsdp" and (reason := fsdp_unsupported_reason()) is not None:
            raise DHPConfigError(reason)
        if fsdp_modules and sharding != "fsdp":
            raise DHPConfigError("fsdp_modules needs sharding='fsdp'")
        if save_distributed_checkpoint and sharding != "fsdp":
            raise DHPConfigError("save_distributed_checkpoint needs sharding='fsdp' (replicas save one full file)")
        if vision_patches_per_device is not None and (isinstance(vision_patches_per_device, bool) or not isinstance(
                vision_patches_per_device, int) or vision_patches_per_device < 1):
            raise DHPConfigError(f"vision_patches_per_device must be a whole number >= 1 or None, got "
                                 f"{vision_patches_per_device!r}")
        if data_wait_timeout is not None and not data_wait_timeout > 0:
            raise DHPConfigError(f"data_wait_timeout must be a positive number of seconds or None, got "
                                 f"{data_wait_timeout!r}")
        if data_wait_timeout is not None and timeout is not None and data_wait_timeout >= timeout.total_seconds():
            raise DHPConfigError(
                f"data_wait_timeout={data_wait_timeout:g} s is not below the collective timeout "
                f"({timeout.total_seconds():g} s): the ranks waiting for a stalled one would time out first, "
                "without knowing why. Lower data_wait_timeout or raise timeout")
        refuse_training_script_rerun_in_a_worker()
        self.tokens_per_device = tokens_per_device
        self.cost_model = cost_model
        self.cp_implementation = cp_implementation
        self.group_free_ring = group_free_ring
        self.node_size = node_size
        self.skip_bad_samples = skip_bad_samples
        self.static_degree = static_degree
        self.activation_checkpointing = _classes(activation_checkpointing)
        self.sharding = sharding
        self.fsdp_modules = _classes(fsdp_modules)
        self.gradient_bucket_mb = gradient_bucket_mb
        self.save_distributed_checkpoint = save_distributed_checkpoint
        self.data_wait_timeout = data_wait_timeout
        self.vision_patches_per_device = vision_patches_per_device
        self.pool = GroupPool(pool_size)
        self.skipped_samples = 0
        self.num_nodes = 1
        self._start_method = start_method
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._trained: dict[str, StepRequest] = {}
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self._scopes = ExitStack()  # open for the whole run
        self._round_scope = ExitStack()  # the current round's CP context, open until its backward ran
        self._round: DHPBatchInfo | None = None
        self._step_counts: tuple[int, int] = (0, 0)  # global loss tokens and samples of the current step
        self._current_request: StepRequest | None = None
        self._gradients: GradientSync | ShardedGradientSync | None = None
        self._device_mesh: DeviceMesh | None = None
        self._skipping = False  # every rank returned None: the step trains nothing
        self._restore_after_setup: bool | None = None  # see restore_checkpoint_after_setup
        self._logged = LoggedShares()

    def __getattr__(self, name: str) -> Any:
        """Only reached for a missing attribute: name the replacement of one that was removed."""
        if name in _REMOVED_ATTRIBUTES:
            raise AttributeError(f"DHPStrategy.{name} was removed; {_REMOVED_ATTRIBUTES[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- environment -------------------------------------------------------------------------------

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_multi_process(self) -> bool:
        return self.num_nodes * self.num_processes > 1

    @property
    def _sharded(self) -> bool:
        """FSDP2 shards the model: ``sharding="fsdp"`` on more than one process (one device keeps it whole)."""
        return self._device_mesh is not None

    @property
    def is_distributed(self) -> bool:
        """Lightning syncs ``self.log(..., sync_dist=True)`` outside DHP steps only when this is true."""
        return self.is_multi_process or _lightning._distributed_is_initialized()

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _lightning._SubprocessScriptLauncher(self.cluster_environment, self.num_processes,
                                                                  self.num_nodes)
        else:
            self._launcher = _lightning._MultiProcessingLauncher(self, start_method=self._start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.set_world_ranks()
        if not self.is_multi_process:  # one device: no process group at all
            return
        reset_seed()
        self._process_group_backend = self._process_group_backend or self._default_backend()
        _lightning._init_dist_connection(self.cluster_environment, self._process_group_backend,
                                         timeout=self._timeout, device_id=world_device_id(self.root_device))
        if self.sharding == "fsdp":  # before configure_model, which may shard with it
            self._device_mesh = init_device_mesh(self.root_device.type, (self.world_size,))
            self.lightning_module._device_mesh = self._device_mesh

    def _default_backend(self) -> str:
        if self.root_device.type == "npu":
            return "hccl"
        return _lightning._get_default_process_group_backend_for_device(self.root_device)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @override
    def setup(self, trainer: Any) -> None:
        _lightning.disable_distributed_sampler(trainer)
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        if isinstance(self.accelerator, NPUAccelerator):
            self.precision_plugin = npu_precision(self.precision_plugin)
        self.model = self.precision_plugin.convert_module(self.model)
        # What can be refused is refused here, the same on every rank, before any collective.
        on_meta = has_meta_tensors(self.lightning_module)
        if on_meta:
            check_materializable(self.lightning_module)
        policy = mixed_precision_policy(self.precision_plugin.precision) if self.sharding == "fsdp" else None
        blocks = blocks_to_shard(self.lightning_module, self.fsdp_modules) if self._sharded else []
        if on_meta and not self._sharded:  # replicas: every rank initialises, then takes rank 0's values
            materialize(self.lightning_module, self.root_device)
        self.model_to_device()
        if self.activation_checkpointing:
            apply_activation_checkpointing(self.lightning_module, self.activation_checkpointing)
        if self.is_multi_process:
            if not is_sharded(self.lightning_module) and not (on_meta and self._sharded):
                _lightning._sync_module_states(self.model)  # shards must be cut from identical parameters
            # outside a planned step, attention has no layout to follow
            self._scopes.enter_context(require_cp_context(
                "cp_attention was called outside a DHP batch on a multi-device run; call it from "
                "training_step/validation_step/test_step/predict_step, which DHPStrategy runs inside the "
                "batch's context-parallel group"))
        if self._sharded:
            self._gradients = ShardedGradientSync(shard_model(self.lightning_module, self._device_mesh, blocks, policy),
                                                  self._device_mesh.get_group())
            if on_meta:  # each rank allocates and initialises its own shards only
                materialize(self.lightning_module, self.root_device)
        else:
            bucket_bytes = None if self.gradient_bucket_mb is None else int(self.gradient_bucket_mb * 2**20)
            self._gradients = GradientSync(self.lightning_module, dist.group.WORLD if self.is_multi_process else None,
                                           bucket_bytes)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _lightning._optimizers_to_device(self.optimizers, self.root_device)
        if self.cost_model == "auto":
            self.cost_model = self._calibrate()
        elif isinstance(self.cost_model, str) and self.cost_model != "profile":  # profiled with the first loader
            self.cost_model = CostModel.load(self.cost_model)

    def _calibrate(self) -> CostModel:
        """Fit the cost model on rank 0's device and share it: every rank must plan with the same model."""
        from lightning_dhp.lightning.profiling import compute_dtype, transformer_step
        from lightning_dhp.planner.calibration import calibrate

        model = None
        if self.global_rank == 0:
            started = time.perf_counter()
            dtype = compute_dtype(self.precision_plugin.precision)
            model, report, _ = calibrate(transformer_step(device=str(self.root_device), dtype=dtype),
                                         base=CostModel.default())
            rank_zero_info(f"DHP: calibrated the cost model on {self.root_device} in {dtype} in "
                           f"{time.perf_counter() - started:.1f} s (fit error: median "
                           f"{report.median_abs_pct_error:.1f}%, p90 {report.p90_abs_pct_error:.1f}%)")
        return self.broadcast(model)

    def _profile(self, dataset: Any, batch_sampler: DHPBatchSampler, packing: DHPPacking,
                 tokens_per_device: int) -> CostModel:
        """Time the user's module on packs of real samples (and, with vision patches, whole items with
        different patch counts), fit, and give every rank rank 0's model."""
        from lightning_dhp.lightning.module_profile import module_pack_runner, profiled_lengths, vision_items
        from lightning_dhp.lightning.profiling import fit_vision_term, profile_cost_model

        started = time.perf_counter()
        lengths, patches = batch_sampler.lengths, batch_sampler.vision_patches
        run_pack, run_item = module_pack_runner(self.lightning_module, dataset, lengths, packing, self.root_device,
                                                self.batch_to_device, patches)
        base = CostModel.default()
        model, report = profile_cost_model(run_pack, profiled_lengths(lengths, tokens_per_device), base=base)
        if model.attention_s_per_token2 <= 0 and model.linear_s_per_token <= 0:
            rank_zero_warn("DHP: the profiled step times did not grow with the tokens (a model this small is all "
                           "per-step overhead); keeping the default model's per-token terms")
            model = dataclasses.replace(model, attention_s_per_token2=base.attention_s_per_token2,
                                        linear_s_per_token=base.linear_s_per_token)
        vision = ""
        chosen = vision_items(lengths, patches, tokens_per_device)
        if chosen:
            model, _ = fit_vision_term(model, run_item, [(index, lengths[index], patches[index]) for index in chosen])
            vision = f"; vision {model.vision_s_per_patch:.3g} s per patch from {len(chosen)} whole items"
        rank_zero_info(f"DHP: profiled the cost model of {type(self.lightning_module).__name__} in "
                       f"{time.perf_counter() - started:.1f} s ({report.summary()}{vision})")
        return self.broadcast(model)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        if not has_meta_tensors(self.model):  # a sharded model built on the meta device is materialised after sharding
            self.model.to(self.root_device)

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """With ``sharding="fsdp"`` and ``empty_init=True`` (``trainer.init_module(empty_init=True)``), modules
        are built on the meta device: the strategy shards them, then allocates and initialises only each
        rank's shards (:mod:`.materialize`)."""
        if not (empty_init and self.sharding == "fsdp"):
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    @override
    def barrier(self, name: str | None = None) -> None:
        if not _lightning._distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _lightning._distributed_is_initialized():
            return obj
        objects = [obj]
        dist.broadcast_object_list(objects, src)
        return objects[0]

    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        if group is ALREADY_SUMMED:  # a value the strategy logged after summing it over ranks
            return tensor
        if isinstance(tensor, torch.Tensor):
            return _lightning._sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Say which step a failed collective belongs to and what it usually means."""
        message = str(exception)
        if self._current_request is not None and _PEER_FAILURE.search(message):
            request = self._current_request
            exception.args = (
                f"DHP: a peer rank died or stalled during global batch {request.position} (epoch {request.epoch}); "
                f"rank {self.global_rank} stopped when a collective failed or passed the timeout ({self._timeout}). "
                "The first error is in the other ranks' logs. If no rank failed, check that every rank makes "
                "the same collective calls in every round: the same number of backward calls (those of the last "
                "round sum gradients over ranks) and, under sharding='fsdp', the same sharded-module calls (a "
                "sharded module called on some ranks only, e.g. only where a rank holds images, waits forever). "
                f"Original error: {message}",)

    # -- checkpoints (sharded models save and load full state dicts) -------------------------------

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """After setup for a sharded model (loaded into its shards) or one built on the meta device (loading
        into meta tensors does nothing). Lightning asks before and after setup: the first answer holds until
        the run's teardown."""
        if self._restore_after_setup is None:
            self._restore_after_setup = self._sharded or has_meta_tensors(self.lightning_module)
        return self._restore_after_setup

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._sharded:
            return super().lightning_module_state_dict()
        return sharding.model_state(self.lightning_module, gather=not self.save_distributed_checkpoint)

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return not self._sharded  # load_checkpoint restores a sharded model's optimizers itself

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self._sharded:  # a sharded model was loaded in load_checkpoint
            super().load_model_state_dict(checkpoint, strict)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if not self._sharded:
            return super().optimizer_state(optimizer)
        return sharding.optimizer_state(self.lightning_module, getattr(optimizer, "_optimizer", optimizer),
                                        gather=not self.save_distributed_checkpoint)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """A full file, or with ``save_distributed_checkpoint`` a folder of every rank's shards."""
        if not (self.save_distributed_checkpoint and self._sharded):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))  # every rank writes its shards into rank 0's folder
        path.mkdir(parents=True, exist_ok=True)
        shards = {"state_dict": checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{index}": state for index, state in enumerate(checkpoint.pop("optimizer_states"))})
        _lightning._distributed_checkpoint_save(shards, path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / _lightning._METADATA_FILENAME)
        return None

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded model loads a full file or a folder of shards (of any world size) straight into its
        shards and its optimizers; what is left (loops, callbacks, loader) goes back to Lightning."""
        if not self._sharded:
            return super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(checkpoint_path))
        state = {"state_dict": self.lightning_module,
                 **{f"optimizer_{index}": optimizer for index, optimizer in enumerate(self.optimizers)}}
        return _lightning._load_checkpoint(path, state, strict=self.lightning_module.strict_loading,
                                           optimizer_states_from_list=True, weights_only=weights_only)

    @override
    def teardown(self) -> None:
        self._close_round()
        if isinstance(self._gradients, GradientSync):
            self._gradients.close()
        self._scopes.close()
        self.pool.clear()
        self._restore_after_setup = None
        if self.lightning_module is not None and has_meta_tensors(self.lightning_module):
            # setup refused the model before materialising it: Lightning's teardown moves it to the CPU,
            # which meta tensors cannot do (and would hide the error)
            self.lightning_module.to_empty(device="cpu")
        super().teardown()

    # -- data --------------------------------------------------------------------------------------

    @override
    def process_dataloader(self, dataloader: object) -> object:
        if isinstance(dataloader, DHPDataLoader) or dataloader == []:  # [] is Lightning's "no loader"
            return dataloader
        batch_sampler = _lightning.unwrap_batch_sampler(getattr(dataloader, "batch_sampler", None))
        if not isinstance(batch_sampler, DHPBatchSampler):
            raise DHPConfigError(
                "DHPStrategy plans every global batch, so its DataLoaders need "
                "`batch_sampler=DHPBatchSampler(lengths, global_batch_size)` (or use DHPDataModule / "
                f"dhp_dataloader); got {type(batch_sampler).__name__}")
        packing = DHPPacking.from_collate_fn(dataloader.collate_fn)
        if self.static_degree is not None and self.world_size % self.static_degree:
            raise DHPConfigError(f"static_degree={self.static_degree} does not divide the {self.world_size} devices; "
                                 f"use one of {divisors(self.world_size)} (or DHP, static_degree=None, which takes "
                                 "any degree)")
        tokens_per_device = self.tokens_per_device or max(batch_sampler.lengths)
        if self.cost_model == "profile":  # the first loader's data profiles the module (every rank at once)
            self.cost_model = self._profile(dataloader.dataset, batch_sampler, packing, tokens_per_device)
        config = PlanConfig(
            num_devices=self.world_size, rank=self.global_rank,
            tokens_per_device=tokens_per_device,
            cost_model=self.cost_model if isinstance(self.cost_model, CostModel) else None,
            node_size=self.node_size or (self.num_processes if self.num_nodes > 1 else None),
            skip_bad_samples=self.skip_bad_samples, static_degree=self.static_degree,
            vision_patches_per_device=self.vision_patches_per_device)
        loader_kwargs = {key: getattr(dataloader, key) for key in
                         ("num_workers", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
                          "persistent_workers")}
        if dataloader.num_workers > 0:
            loader_kwargs["prefetch_factor"] = dataloader.prefetch_factor
        return DHPDataLoader(dataloader.dataset, batch_sampler, config, packing, self._trained,
                             data_wait_timeout=self.data_wait_timeout, **loader_kwargs)

    # -- steps -------------------------------------------------------------------------------------

    @override
    def training_step(self, step: PlannedStep, batch_idx: int) -> Any:
        module = self.lightning_module
        automatic = module.automatic_optimization
        self._begin_step(step)
        returned_none, earlier_losses, output = 0, [], None
        with self._logged.capture(module):
            for round_index in range(len(step.plan.rounds)):
                batch = self._enter_round(step, round_index)
                output = super().training_step(batch, batch_idx)
                loss = loss_of(output)
                returned_none += loss is None
                if round_index == len(step.plan.rounds) - 1:
                    continue
                if automatic and self.is_multi_process:  # the backward below may communicate: agree first
                    self._check_none(step, self._all_gather_tensor(self._none_report(loss is None))[:, 0], 1)
                if loss is None:
                    continue
                earlier_losses.append(loss.detach())
                if automatic:  # backward now, so only one round's activations are alive
                    assert self._gradients is not None
                    with self._gradients.early_backward():
                        self.backward(loss / module.trainer.accumulate_grad_batches, None)
        if not automatic:  # the user's backwards ran in the step: the last round is over
            self._close_round()
        every_rank_returned = self._finish_step(step, returned_none, strict=automatic)
        self._trained[step.request.loader_id] = step.request
        if every_rank_returned:
            step_loss = sum(earlier_losses, loss_of(output))  # the whole share's value, the last round's graph
            self._logged.add("dhp/loss", step_loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self._publish()
        if every_rank_returned:
            return _with_loss(output, step_loss)
        if automatic:
            # Lightning's skip, which it refuses on several processes: no backward, gradients stay as they
            # are (None after zero_grad), so the optimizer leaves every parameter and its state alone.
            assert self._gradients is not None
            self._gradients.discard()
            self._skipping = True
            return torch.zeros((), device=self.root_device)
        return None

    @override
    def validation_step(self, step: PlannedStep, batch_idx: int, *args: Any) -> Any:
        return self._evaluation_step(step, super().validation_step, batch_idx, *args)

    @override
    def test_step(self, step: PlannedStep, batch_idx: int, *args: Any) -> Any:
        return self._evaluation_step(step, super().test_step, batch_idx, *args)

    @override
    def predict_step(self, step: PlannedStep, batch_idx: int, *args: Any) -> list[Any]:
        """One output per sample of the global batch, in the batch's order, the same on every rank."""
        self._begin_step(step, training=False)
        pieces = []
        for round_index in range(len(step.plan.rounds)):
            batch = self._enter_round(step, round_index)
            pieces.append(piece_of(batch["dhp"], super().predict_step(batch, batch_idx, *args)))
        self._close_round()
        gathered = self._all_gather_objects([piece for piece in pieces if piece is not None])
        _lightning.record_prediction_indices(self.lightning_module.trainer, list(step.request.sample_ids),
                                             dataloader_idx=args[0] if args else 0)
        return assemble([piece for rank_pieces in gathered for piece in rank_pieces], step.request.sample_ids)

    def _evaluation_step(self, step: PlannedStep, user_step: Callable[..., Any], *args: Any) -> Any:
        self._begin_step(step, training=False)
        output = None
        with self._logged.capture(self.lightning_module):
            for round_index in range(len(step.plan.rounds)):
                output = user_step(self._enter_round(step, round_index), *args)
        self._close_round()
        self._finish_step(step, returned_none=0, strict=False)
        self._publish()
        return output

    def _enter_round(self, step: PlannedStep, round_index: int) -> dict[str, Any]:
        """This round's batch on the device, its CP context current until the round's backward ran."""
        self._close_round()
        batch, step.rounds[round_index] = step.rounds[round_index], None  # free each round after use
        info = batch.pop("dhp")
        batch = self.batch_to_device(batch)
        info.global_loss_tokens, info.global_samples = self._step_counts
        batch["dhp"] = info
        self._round_scope.enter_context(cp_context(CPContext(
            layout=info.layout, group=self._group_of(info.group_ranks), ranks=info.group_ranks,
            implementation=self.cp_implementation)))
        self._round = info
        return batch

    def _close_round(self) -> None:
        self._round_scope.close()
        self._round = None

    def _group_of(self, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        if len(ranks) == 1:
            return None
        if self.group_free_ring:
            return dist.group.WORLD
        return self._groups[ranks]

    # -- agreement ---------------------------------------------------------------------------------

    def _begin_step(self, step: PlannedStep, training: bool = True) -> None:
        """Agree on the plan and on bad data, count the global batch, and take the plan's groups."""
        self._close_round()
        self._skipping = False
        self._current_request = step.request
        digest = _digest_number(step.plan) if step.plan is not None else 0
        report = torch.tensor([step.leader_loss_tokens, step.failed_to_load, digest, step.leader_skipped],
                              dtype=torch.int64, device=self.root_device)
        reports = self._all_gather_tensor(report)
        if reports[:, 1].any():
            failures = self._all_gather_objects((step.error, step.loader_failure))
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
        digests = reports[:, 2]
        if (digests != digests[0]).any():
            differing = [rank for rank in range(len(digests)) if digests[rank] != digests[0]]
            raise DHPRankMismatchError(
                f"ranks disagree on the plan of global batch {step.request.position} (epoch {step.request.epoch}): "
                f"ranks {differing} differ from rank 0. Every rank must see the same dataset lengths, sampler "
                "seed, tokens_per_device and cost model")
        skipped = int(reports[:, 3].sum())
        self._step_counts = (int(reports[:, 0].sum()), len(step.request.sample_ids) - skipped)
        if training:
            self.skipped_samples += skipped
            assert self._gradients is not None
            self._gradients.new_step()
        if self.is_multi_process and not self.group_free_ring:
            self._groups = self.pool.acquire_plan(group.ranks for round_ in step.plan.rounds for group in round_.groups)

    def _finish_step(self, step: PlannedStep, returned_none: int, strict: bool) -> bool:
        """Check that ranks logged the same names and (``strict``: automatic optimization) agree on None;
        True if every round of every rank returned a value."""
        header = torch.tensor([returned_none, self._logged.digest()], dtype=torch.int64, device=self.root_device)
        headers = self._all_gather_tensor(header)
        where = f"global batch {step.request.position} (epoch {step.request.epoch})"
        if (headers[:, 1] != headers[0, 1]).any():
            raise DHPRankMismatchError(
                f"ranks logged different values in {where}: inside a DHP step every rank must make the same "
                "self.log calls in every round (an idle rank runs your step on an empty batch: log there too)")
        if strict:
            self._check_none(step, headers[:, 0], len(step.plan.rounds))
        return int(headers[:, 0].sum()) == 0

    def _none_report(self, returned_none: bool) -> torch.Tensor:
        return torch.tensor([int(returned_none)], dtype=torch.int64, device=self.root_device)

    def _check_none(self, step: PlannedStep, nones_by_rank: torch.Tensor, rounds: int) -> None:
        """None must come from every rank in every round, or from none: a partial None cannot skip a
        global batch consistently (and would leave a peer waiting in a ring's backward)."""
        total = int(nones_by_rank.sum())
        if 0 < total < self.world_size * rounds:
            ranks = [rank for rank in range(len(nones_by_rank)) if nones_by_rank[rank]]
            raise DHPRankMismatchError(
                f"training_step returned None on ranks {ranks} in global batch {step.request.position} (epoch "
                f"{step.request.epoch}) but a loss elsewhere. Under DHP each rank runs your step once per round on "
                "part of the global batch (an empty batch where it is idle); return None in every round on every "
                "rank to skip the whole global batch, or return a loss (e.g. loss_share of a zero sum)")

    def _publish(self) -> None:
        if self.is_multi_process and len(self._logged):
            self._logged.sum_over_ranks(dist.all_reduce, self.root_device)
        self._logged.publish(self.lightning_module, global_batch_size=self._step_counts[1])

    def _all_gather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.is_multi_process:
            return tensor.unsqueeze(0).cpu()
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor)
        return torch.stack(gathered).cpu()

    def _all_gather_objects(self, value: Any) -> list[Any]:
        if not self.is_multi_process:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    # -- gradients ---------------------------------------------------------------------------------

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        """Lightning's backward, plus: a round with nothing to differentiate runs no autograd, and the
        last round's backward ends with the gradient sum (before ``on_after_backward``, as under DDP)."""
        round_ = self._round
        if round_ is None:  # a backward outside a DHP step
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        assert self._gradients is not None
        self._gradients.before_backward(round_.is_last_round)
        if closure_loss.requires_grad and not self._skipping:
            self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        if round_.is_last_round:
            self._gradients.finish_backward(only_if_any=self._skipping)
            if module.automatic_optimization:  # Lightning's one backward of the last round ends the step
                self._close_round()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @contextmanager
    @override
    def block_backward_sync(self) -> Iterator[None]:
        """While Lightning accumulates gradients over global batches, do not sum them over ranks yet."""
        assert self._gradients is not None
        enabled, self._gradients.enabled = self._gradients.enabled, False
        try:
            yield
        finally:
            self._gradients.enabled = enabled

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        round_ = self._round
        if round_ is not None and not round_.is_last_round:
            raise DHPConfigError(
                f"the optimizer stepped in round {round_.round_index + 1} of {round_.num_rounds} of a global batch. "
                "Under DHP manual optimization runs training_step once per round: call self.manual_backward(loss) "
                "in every round and step (and zero_grad) only when batch['dhp'].is_last_round")
        return super().optimizer_step(optimizer, closure, model, **kwargs)


def _classes(classes: ModuleClasses | None) -> tuple[type[nn.Module], ...]:
    """Module classes given as classes or import paths ("package.module.Class", as configs write them)."""
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


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    if isinstance(output, dict):
        return {**output, "loss": loss}
    return loss


def _digest_number(plan: Plan) -> int:
    return int(plan.digest()[:15], 16)
