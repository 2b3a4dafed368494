"""DHPStrategy: every global batch planned onto context-parallel groups whose sizes change per batch.

A :class:`~lightning.pytorch.strategies.ParallelStrategy` (like Lightning's ModelParallelStrategy): the model
is never wrapped, ranks run different shapes. The strategy is Lightning's hooks; the work is in
:mod:`.config` (the options), :mod:`.prepare` (``setup``'s model preparation), :mod:`.planning_model` (the
cost model), :mod:`.planned_loader` (``process_dataloader``: plan each global batch, collate this rank's
rounds), :mod:`.step` (the ``*_step`` hooks and ``backward``: agreement, rounds, None/skip, logged shares),
:mod:`.gradients` / :mod:`.sharding` (one gradient sum over the world after the last round's backward) and
:mod:`.checkpoints` (the checkpoint hooks, inherited from :class:`~.checkpoints.CheckpointHooks`: a sharded
model saves and loads full state dicts or folders of shards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dhp.distributed import require_cp_context
from lightning_dhp.distributed.pool import GroupPool
from lightning_dhp.distributed.world import world_device_id
from lightning_dhp.errors import DHPConfigError
from lightning_dhp.lightning import _lightning, planned_loader, planning_model, prepare
from lightning_dhp.lightning.checkpoints import CheckpointHooks
from lightning_dhp.lightning.collate import DHPPacking
from lightning_dhp.lightning.config import DHPConfig
from lightning_dhp.lightning.materialize import has_meta_tensors
from lightning_dhp.lightning.npu import NPUAccelerator, npu_precision
from lightning_dhp.lightning.planned_loader import DHPDataLoader, PlanConfig, PlannedStep, StepRequest
from lightning_dhp.lightning.shares import ALREADY_SUMMED
from lightning_dhp.lightning.step import StepRunner, World
from lightning_dhp.lightning.workers import refuse_training_script_rerun_in_a_worker
from lightning_dhp.planner import CostModel

_REMOVED_ATTRIBUTES = {
    "plan_history": "each step's plan, timings and tokens are in the DHPPlanReport callback's `history`: "
                    "Trainer(callbacks=[DHPPlanReport()]), then report.history (lightning_dhp.lightning.DHPPlanReport)",
}
_OPTIONS = frozenset(DHPConfig.option_names())


class DHPStrategy(CheckpointHooks, ParallelStrategy):
    """Dynamic Hybrid Parallelism: per-batch context-parallel groups of any size.

    Takes the options of :class:`DHPConfig` one by one (the first four also by position), as
    ``DHPStrategy(tokens_per_device=4096)``, or ready-made as ``DHPStrategy(config=DHPConfig(...))``; they are
    read back as ``strategy.config`` (or ``strategy.<option>``). ``process_group_backend`` and ``timeout`` are
    as for Lightning's DDPStrategy (``timeout`` bounds every collective, so a stalled rank stops the others
    with the step named); Lightning's own arguments (``parallel_devices``, ...) pass through.
    ``planning_cost_model`` is the :class:`CostModel` the planner uses (``None``: its default).
    """

    strategy_name = "dhp"

    def __init__(self, *options: Any, config: DHPConfig | None = None, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout, **kwargs: Any) -> None:
        named = {name: kwargs.pop(name) for name in list(kwargs) if name in _OPTIONS}
        if config is not None and (options or named):
            given = ", ".join([*map(repr, options), *(f"{name}=" for name in named)])
            raise DHPConfigError(f"DHPStrategy takes its options either as config=DHPConfig(...) or one by one, not "
                                 f"both; got config= and {given}: set them in the config (dataclasses.replace)")
        super().__init__(**kwargs)
        self.config = config = config if config is not None else DHPConfig(*options, **named)
        config.check_collective_timeout(timeout)
        refuse_training_script_rerun_in_a_worker()
        self.planning_cost_model: CostModel | None = None
        self.pool = GroupPool(config.pool_size)
        self.skipped_samples = 0
        self.num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._trained: dict[str, StepRequest] = {}  # per loader, the last request trained (the loader's state)
        self._scopes = ExitStack()  # open for the whole run
        self._device_mesh: DeviceMesh | None = None  # FSDP2's, from setup_environment; None: the model is whole
        self._steps = StepRunner(self.pool, config, self.batch_to_device)

    def __getattr__(self, name: str) -> Any:
        """Only reached for a missing attribute: an option reads from the config; a removed attribute names
        its replacement."""
        if name in _OPTIONS and "config" in self.__dict__:
            return getattr(self.config, name)
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
    def is_distributed(self) -> bool:
        """Lightning syncs ``self.log(..., sync_dist=True)`` outside DHP steps only when this is true."""
        return self.is_multi_process or _lightning._distributed_is_initialized()

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.config.start_method == "popen":
            self._launcher = _lightning._SubprocessScriptLauncher(self.cluster_environment, self.num_processes,
                                                                  self.num_nodes)
        else:
            self._launcher = _lightning._MultiProcessingLauncher(self, start_method=self.config.start_method)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self.set_world_ranks()
        if not self.is_multi_process:  # one device: no process group at all
            return
        reset_seed()
        self._process_group_backend = self._process_group_backend or (
            "hccl" if self.root_device.type == "npu"
            else _lightning._get_default_process_group_backend_for_device(self.root_device))
        _lightning._init_dist_connection(self.cluster_environment, self._process_group_backend,
                                         timeout=self._timeout, device_id=world_device_id(self.root_device))
        if self.config.sharding == "fsdp":  # before configure_model, which may shard with it
            self._device_mesh = init_device_mesh(self.root_device.type, (self.world_size,))
            _lightning.set_device_mesh(self.lightning_module, self._device_mesh)

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
        preparation = prepare.check(self.lightning_module, self.config, self.root_device, self._device_mesh,
                                    self.is_multi_process, self.precision_plugin.precision)
        self._steps.world = World(self.world_size, self.root_device, self.is_multi_process)
        self._steps.gradients = prepare.prepare_model(self.lightning_module, preparation)
        if self.is_multi_process:  # outside a planned step, attention has no layout to follow
            self._scopes.enter_context(require_cp_context(
                "cp_attention was called outside a DHP batch on a multi-device run; call it from "
                "training_step/validation_step/test_step/predict_step, which DHPStrategy runs inside the "
                "batch's context-parallel group"))
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _lightning._optimizers_to_device(self.optimizers, self.root_device)
        if self.planning_cost_model is None:
            self.planning_cost_model = planning_model.resolve_at_setup(self.config.cost_model, self)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        prepare.move_to_device(self.model, self.root_device)

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """With ``sharding="fsdp"`` and ``empty_init=True`` (``trainer.init_module(empty_init=True)``), modules
        are built on the meta device: the strategy shards them, then allocates and initialises only each
        rank's shards (:mod:`.prepare`)."""
        if not (empty_init and self.config.sharding == "fsdp"):
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
        self._steps.explain_peer_failure(exception, self.global_rank, self._timeout)

    @override
    def teardown(self) -> None:
        self._steps.close()
        self._scopes.close()
        self.pool.clear()
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
        batch_sampler = planned_loader.dhp_batch_sampler_of(dataloader)
        packing = DHPPacking.from_collate_fn(dataloader.collate_fn)
        config = self.config
        config.check_static_degree(self.world_size)
        tokens_per_device = config.tokens_per_device or max(batch_sampler.lengths)
        if config.cost_model == planning_model.PROFILE and self.planning_cost_model is None:
            # the first loader's data profiles the module (every rank at once)
            self.planning_cost_model = planning_model.profile(self, dataloader.dataset, batch_sampler, packing,
                                                              tokens_per_device)
        plan_config = PlanConfig(
            num_devices=self.world_size, rank=self.global_rank, tokens_per_device=tokens_per_device,
            cost_model=self.planning_cost_model,
            node_size=config.node_size or (self.num_processes if self.num_nodes > 1 else None),
            skip_bad_samples=config.skip_bad_samples, static_degree=config.static_degree,
            vision_patches_per_device=config.vision_patches_per_device, planner_options=config.planner_options)
        return DHPDataLoader.like(dataloader, batch_sampler, plan_config, packing, self._trained,
                                  data_wait_timeout=config.data_wait_timeout)

    # -- steps (the work is in step.py) ------------------------------------------------------------

    @override
    def training_step(self, step: PlannedStep, batch_idx: int) -> Any:
        user_step = super().training_step
        output = self._steps.train(step, self.lightning_module, lambda batch: user_step(batch, batch_idx),
                                   lambda loss: self.backward(loss, None))
        self.skipped_samples += self._steps.state.skipped_samples
        self._trained[step.request.loader_id] = step.request
        return output

    @override
    def validation_step(self, step: PlannedStep, batch_idx: int, *args: Any) -> Any:
        user_step = super().validation_step
        return self._steps.evaluate(step, self.lightning_module, lambda batch: user_step(batch, batch_idx, *args))

    @override
    def test_step(self, step: PlannedStep, batch_idx: int, *args: Any) -> Any:
        user_step = super().test_step
        return self._steps.evaluate(step, self.lightning_module, lambda batch: user_step(batch, batch_idx, *args))

    @override
    def predict_step(self, step: PlannedStep, batch_idx: int, *args: Any) -> list[Any]:
        """One output per sample of the global batch, in the batch's order, the same on every rank."""
        user_step = super().predict_step
        outputs = self._steps.predict(step, lambda batch: user_step(batch, batch_idx, *args))
        _lightning.record_prediction_indices(self.lightning_module.trainer, list(step.request.sample_ids),
                                             dataloader_idx=args[0] if args else 0)
        return outputs

    # -- gradients ---------------------------------------------------------------------------------

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Any:
        """Lightning's backward, plus: a round with nothing to differentiate runs no autograd, and the
        last round's backward ends with the gradient sum (before ``on_after_backward``, as under DDP)."""
        state = self._steps.state
        if state is None or state.round is None:  # a backward outside a DHP step
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        with self._steps.round_backward(module.automatic_optimization) as differentiate:
            if differentiate and closure_loss.requires_grad:
                self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @contextmanager
    @override
    def block_backward_sync(self) -> Iterator[None]:
        """While Lightning accumulates gradients over global batches, do not sum them over ranks yet."""
        with self._steps.gradient_sum_deferred():
            yield

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None,
                       **kwargs: Any) -> Any:
        self._steps.check_optimizer_step()
        return super().optimizer_step(optimizer, closure, model, **kwargs)
