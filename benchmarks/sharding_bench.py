"""Memory per rank and step time under replicated and sharded (FSDP2) DHP, plus a projection to real MLLMs.

Each variant fine-tunes a ~50M-parameter configuration of the example's tiny VLM for a few steps on
gloo CPU processes (``lightning_dhp.testing.run_distributed``). Memory per rank counts the bytes of the
tensors the rank holds after the last step (its parameters, gradients and AdamW state: local shards
under FSDP2) and its peak RSS. Step times come from ``DHPPlanReport`` (batch start to end), first
step left out. Variants run interleaved, the order rotating every repeat.

    python benchmarks/sharding_bench.py --json benchmarks/results/sharding.json

``--init-memory`` measures what building the model costs each rank: a 0.9 GB (float32) configuration
of the tiny VLM, sharded over 2 processes, built whole or on the meta device
(``trainer.init_module(empty_init=True)``), alternating; each rank's peak RSS growth from before the
model is built until training would start.

The projection (``--projection``) needs no run: bytes of parameters, gradients and AdamW state per
rank for bf16 training with fp32 master weights (16 bytes per parameter) replicated or sharded over
N ranks, against an 80 GB device, for 2B/7B/8B language models (activations not included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_dhp.testing import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _e2e_run import compose_config  # a sibling helper: benchmarks/ is run as scripts

MODEL = ["model.config.hidden_size=640", "model.config.num_layers=8", "model.config.num_heads=8",
         "model.config.num_kv_heads=4", "model.config.intermediate_size=1728"]
DATA = ["data.num_train=256", "data.global_batch_size=8", "data.num_workers=0", "data.max_frames=8",
        "data.frame_sizes=[16]"]
TOKENS_PER_DEVICE = 128
FSDP = {"sharding": "fsdp", "fsdp_modules": ["lightning_dhp.models.tiny_vlm.DecoderLayer"]}
VARIANTS = {  # name: DHPStrategy keyword arguments, and whether the model is built on the meta device
    "replicate, flat sum": ({"sharding": "replicate", "gradient_bucket_mb": None}, False),
    "replicate, overlapped buckets": ({"sharding": "replicate"}, False),
    "fsdp": (FSDP, False),
    "fsdp, built on meta": (FSDP, True),
}
INIT_MODEL = ["model.config.hidden_size=1536", "model.config.num_layers=8", "model.config.num_heads=12",
              "model.config.num_kv_heads=4", "model.config.intermediate_size=4096"]
PROJECTED = {"2B (InternVL3-2B-like LM)": 1.8e9, "7B (Qwen2.5-VL-7B-like LM)": 7.6e9,
             "8B (InternVL3-8B-like LM)": 8.1e9}
BYTES_PER_PARAMETER = 16  # bf16 weights and gradients (2 + 2), fp32 master weights (4), AdamW moments (4 + 4)


def _local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _prepare(rank: int, world_size: int, model: list[str], strategy_kwargs: dict[str, Any], steps: int,
             callbacks: list[Any]) -> tuple[Any, Any, Any]:
    """This rank's (Trainer, the model's config, DHPDataModule) for the example's VLM configured by ``model``."""
    from lightning.pytorch import Trainer, seed_everything

    from lightning_dhp import DHPDataModule, DHPStrategy
    from lightning_dhp.app.main import build_datasets

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    cfg = compose_config([*model, *DATA])
    seed_everything(cfg.seed, verbose=False)
    train_set, _, _ = build_datasets(cfg)
    trainer = Trainer(accelerator="cpu", devices=world_size, max_steps=steps, logger=False, callbacks=callbacks,
                      strategy=DHPStrategy(TOKENS_PER_DEVICE, **strategy_kwargs), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    data = DHPDataModule(train_set, train_set.lengths.tolist(), cfg.data.global_batch_size, seed=cfg.seed)
    return trainer, cfg.model, data


def _build(trainer: Any, model_config: Any, on_meta: bool) -> Any:
    """The task, built whole or (``on_meta``) on the meta device."""
    from hydra.utils import instantiate

    with trainer.init_module(empty_init=on_meta):
        return instantiate(model_config, _convert_="all")


def _train(rank: int, world_size: int, strategy_kwargs: dict[str, Any], on_meta: bool, steps: int) -> dict[str, Any]:
    from lightning_dhp import DHPPlanReport

    report = DHPPlanReport(dirpath=tempfile.mkdtemp(prefix="dhp-sharding-bench-"), log_metrics=False)
    trainer, model_config, data = _prepare(rank, world_size, MODEL, strategy_kwargs, steps, [report])
    task = _build(trainer, model_config, on_meta)
    trainer.fit(task, datamodule=data)
    params = list(task.parameters())
    optimizer_state = [value for state in trainer.optimizers[0].state.values() for value in state.values()
                       if isinstance(value, torch.Tensor)]
    return {"parameters": sum(p.numel() for p in params) if not hasattr(params[0], "to_local") else None,
            "param_bytes": sum(_local_bytes(p) for p in params),
            "grad_bytes": sum(_local_bytes(p.grad) for p in params),
            "optimizer_bytes": sum(_local_bytes(value) for value in optimizer_state),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "step_s": [entry["measured_s"] for entry in report.history[1:]]}


class _StopBeforeTraining(Exception):
    """Raised from ``on_fit_start``: the model is sharded and materialised, nothing trained yet."""


def _init_memory(rank: int, world_size: int, on_meta: bool) -> dict[str, float]:
    from lightning.pytorch import Callback, Trainer

    class Stop(Callback):
        def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
            raise _StopBeforeTraining

    trainer, model_config, data = _prepare(rank, world_size, INIT_MODEL, FSDP, 1, [Stop()])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    task = _build(trainer, model_config, on_meta)
    with contextlib.suppress(_StopBeforeTraining):
        trainer.fit(task, datamodule=data)
    return {"model_gb": sum(p.numel() * p.element_size() for p in task.parameters()) / 1e9,
            "shard_gb": sum(_local_bytes(p) for p in task.parameters()) / 1e9,
            "peak_rss_growth_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 1e9}


def measure_init_memory(world_size: int, repeats: int) -> list[str]:
    lines = ["| model built | model (GB) | its shard per rank (GB) | peak RSS growth per rank, setup (GB) |",
             "| --- | --- | --- | --- |"]
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for repeat in range(repeats):
        for on_meta in (repeat % 2 == 1, repeat % 2 == 0):
            results[on_meta] += run_distributed(_init_memory, world_size, on_meta, timeout_s=1200)
    for on_meta, ranks in results.items():
        growth = [rank["peak_rss_growth_gb"] for rank in ranks]
        lines.append(f"| {'on the meta device' if on_meta else 'whole, on every rank'} | {ranks[0]['model_gb']:.2f} "
                     f"| {ranks[0]['shard_gb']:.2f} | {statistics.median(growth):.2f} "
                     f"({min(growth):.2f}-{max(growth):.2f}) |")
    return lines


def measure(world_sizes: list[int], repeats: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    for world_size in world_sizes:
        names = list(VARIANTS) if world_size > 1 else ["replicate, flat sum"]
        for repeat in range(repeats):
            rotation = repeat % len(names)
            for name in names[rotation:] + names[:rotation]:
                ranks = run_distributed(_train, world_size, *VARIANTS[name], steps, timeout_s=1200)
                rows.append({"variant": name, "devices": world_size, "repeat": repeat, "ranks": ranks})
                print(f"{world_size} processes, {name}, repeat {repeat}: state "
                      f"{_state_gb(ranks[0]):.3f} GB/rank, step {statistics.median(ranks[0]['step_s']):.2f} s",
                      flush=True)
    return rows


def _state_gb(rank: dict[str, Any]) -> float:
    return (rank["param_bytes"] + rank["grad_bytes"] + rank["optimizer_bytes"]) / 1e9


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| devices | variant | params+grads+AdamW per rank (GB) | peak RSS rank 0 (GB) | step s (median, range) |",
             "| --- | --- | --- | --- | --- |"]
    for devices in sorted({row["devices"] for row in rows}):
        for name in VARIANTS:
            chosen = [row for row in rows if row["devices"] == devices and row["variant"] == name]
            if not chosen:
                continue
            steps = [step for row in chosen for step in row["ranks"][0]["step_s"]]
            rss = max(row["ranks"][0]["peak_rss_bytes"] for row in chosen) / 1e9
            lines.append(f"| {devices} | {name} | {_state_gb(chosen[0]['ranks'][0]):.3f} | {rss:.2f} | "
                         f"{statistics.median(steps):.2f} ({min(steps):.2f}-{max(steps):.2f}) |")
    return lines


def ratios(rows: list[dict[str, Any]], devices: int) -> dict[str, float]:
    """Median step time of each variant over the overlapped replicate one, per repeat, then the median."""
    result = {}
    base = "replicate, overlapped buckets"
    for name in VARIANTS:
        per_repeat = []
        for repeat in sorted({row["repeat"] for row in rows}):
            pair = {row["variant"]: statistics.median(row["ranks"][0]["step_s"]) for row in rows
                    if row["devices"] == devices and row["repeat"] == repeat}
            if name in pair and base in pair:
                per_repeat.append(pair[name] / pair[base])
        if per_repeat:
            result[name] = statistics.median(per_repeat)
    return result


def projection(ranks: tuple[int, ...] = (8, 16, 32, 64), device_gb: float = 80.0) -> list[str]:
    lines = ["| model | replicated (GB/rank) | " + " | ".join(f"FSDP over {n} (GB/rank)" for n in ranks) + " |",
             "| --- | --- | " + " | ".join("---" for _ in ranks) + " |"]
    for name, parameters in PROJECTED.items():
        whole = parameters * BYTES_PER_PARAMETER / 1e9
        cells = [f"{whole:.0f}{' (does not fit)' if whole > device_gb else ''}"]
        cells += [f"{whole / n:.1f}" for n in ranks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--projection", action="store_true", help="print the 2B/7B/8B projection only")
    parser.add_argument("--init-memory", action="store_true",
                        help="only the memory of building a 0.9 GB model whole or on the meta device, 2 processes")
    args = parser.parse_args()
    if args.projection:
        print("\n".join(projection()))
        return
    if args.init_memory:
        print("\n".join(measure_init_memory(2, args.repeats)))
        return
    rows = measure([int(d) for d in args.devices.split(",")], args.repeats, args.steps)
    print("\n".join(summary(rows)))
    largest = max(row["devices"] for row in rows)
    print(f"step time / overlapped replicate at {largest} processes: {ratios(rows, largest)}")
    print("\n".join(projection()))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"rows": rows, "ratios": ratios(rows, largest), "model_overrides": MODEL, "data": DATA},
                      file, indent=1)


if __name__ == "__main__":
    main()
