"""Loader start-up under stress: how often does a training run hang before (or while) it gets its data?

Each *world* is a fresh training job launched as users launch one: this script runs as a subprocess in a
session of its own with ``Trainer(devices=N)``, Lightning's own launcher starts the other ranks (the script
again) and creates the world process group (TCP store, gloo). Every rank runs ``--fits`` short
``trainer.fit`` calls of a tiny LM under DHP, with one DataLoader worker per rank and validation after every
step, so each fit starts loader workers right after process groups were created (the world's at start-up,
the pool's at the first step). Ranks keep Linux's default start method, ``fork``. A world that does not
finish within ``--world-timeout`` seconds is killed (with its whole session) and counted as hung; one that
fails is counted as failed, and as a *stall caught* when its error is the strategy's data-wait watchdog
(``DHPLoaderError``; ``--data-wait-timeout``, by default a quarter of the world timeout, so it can fire
first). Before a hung world is killed, every process of it dumps its Python stacks (kept in the JSON).

``--context`` is the loader workers' start method: ``dhp`` (the strategy's choice when the DataLoader names
none), or ``fork`` / ``forkserver`` / ``spawn`` passed as the DataLoader's ``multiprocessing_context``.
Several contexts run interleaved (the order rotates every world), so load drifts hit every context alike.
The table gives, per context, hung and failed worlds per 100 fits and the time from Lightning's ``setup`` hook
to the first batch on rank 0 (worker start-up included; median and min-max), for the first fit of each
process (which also starts the forkserver) and for the later fits.

Usage: python benchmarks/loader_stress.py [--quick] [--worlds 60] [--devices 2,3,4] [--fits 3]
       [--context dhp,fork] [--data-wait-timeout S] [--json PATH]
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_dhp import DHPStrategy, cp_attention, loss_share
from lightning_dhp.errors import DHPLoaderError
from lightning_dhp.lightning import DHPBatchSampler, DHPPacking
from lightning_dhp.lightning.workers import STACK_SIGNAL
from lightning_dhp.testing import run_job

CONTEXTS = ("dhp", "fork", "forkserver", "spawn")
RUN_ENV = {"OMP_NUM_THREADS": "1", "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}
LENGTHS = [37, 5, 9, 2, 16, 23, 4, 11, 30, 6, 3, 14, 1, 19, 8, 27, 12, 7, 21, 10, 2, 33, 5, 13]


class TinyLM(LightningModule):
    def __init__(self, vocab: int = 32, hidden: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.embed = nn.Embedding(vocab, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, vocab)

    def loss(self, batch: dict) -> torch.Tensor:
        x = self.embed(batch["input_ids"])
        q, k, v = self.qkv(x).view(len(x), 3, self.heads, self.head_dim).unbind(1)
        logits = self.head(x + cp_attention(q, k, v).flatten(1))
        return loss_share(F.cross_entropy(logits, batch["labels"], reduction="sum"), batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.samples = [torch.randint(0, 32, (n,), generator=generator) for n in LENGTHS]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.samples[index]}


class FirstBatchTimer(Callback):
    """Seconds from Lightning's ``setup`` hook (the process group exists) to the first training batch: the
    data and model set up, the train loader's workers started, the first global batch planned and loaded."""

    def __init__(self) -> None:
        self.started = 0.0
        self.first_batch_s: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.started = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch_s is None:
            self.first_batch_s = time.perf_counter() - self.started


def _loader(seed: int, context: str, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        Tokens(seed), batch_sampler=DHPBatchSampler(LENGTHS, 6, shuffle=shuffle), collate_fn=DHPPacking(),
        num_workers=1, persistent_workers=True, multiprocessing_context=None if context == "dhp" else context)


def fits(world_size: int, context: str, num_fits: int, data_wait_timeout: float | None) -> list[float]:
    """``num_fits`` short fits (this process is one rank of a Lightning-launched job); on global rank 0, each
    fit's seconds to its first batch."""
    first_batch = []
    for _ in range(num_fits):
        timer = FirstBatchTimer()
        trainer = Trainer(accelerator="cpu", devices=world_size, max_steps=2, val_check_interval=1,
                          limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer],
                          strategy=DHPStrategy(20, data_wait_timeout=data_wait_timeout))
        trainer.fit(TinyLM(), _loader(0, context, True), _loader(1, context, False))
        first_batch.append(timer.first_batch_s)
    return first_batch


@dataclass
class ContextResult:
    context: str
    worlds: int = 0
    fits: int = 0
    hung: int = 0
    failed: int = 0
    stalls_caught: int = 0
    first_batch_s: list[list[float]] = field(default_factory=list)  # per world that finished, per fit
    hung_stacks: list[str] = field(default_factory=list)  # every process's Python stacks, per hung world
    errors: list[str] = field(default_factory=list)

    def per_100_fits(self, count: int) -> float:
        return 100 * count / max(self.fits, 1)


def run_world(result: ContextResult, world_size: int, num_fits: int, world_timeout_s: float,
              data_wait_timeout: float | None) -> str:
    """Run one world; record its outcome in ``result`` and return it ("ok", "hung", "stall" or "failed")."""
    result.worlds += 1
    result.fits += num_fits
    with tempfile.TemporaryDirectory(prefix="dhp-stress-") as folder:
        spec = Path(folder, "spec.json")
        spec.write_text(json.dumps({"devices": world_size, "context": result.context, "fits": num_fits,
                                    "data_wait_timeout": data_wait_timeout, "result": str(Path(folder, "out.json"))}))
        exit_code, errors = run_job([sys.executable, __file__, "--world", str(spec)], world_timeout_s, env=RUN_ENV,
                                    stack_signal=STACK_SIGNAL)  # every rank of a hung world dumps its stacks
        if exit_code is None:
            result.hung += 1
            result.hung_stacks.append(errors[-20000:])
            return "hung"
        out = Path(folder, "out.json")
        if exit_code or not out.exists():
            result.failed += 1
            result.errors.append(errors[-3000:])
            if DHPLoaderError.__name__ in errors:
                result.stalls_caught += 1
                return "stall"
            return "failed"
        result.first_batch_s.append(json.loads(out.read_text()))
    return "ok"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def run_world_job(spec_path: str) -> None:
    """The job of one world, on every rank (Lightning's launcher runs this script once per rank)."""
    faulthandler.register(STACK_SIGNAL, all_threads=True)  # a hung world's stacks, for the report
    spec = json.loads(Path(spec_path).read_text())
    first_batch = fits(spec["devices"], spec["context"], spec["fits"], spec["data_wait_timeout"])
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        Path(spec["result"]).write_text(json.dumps(first_batch))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one world of 2 processes per context, one fit")
    parser.add_argument("--worlds", type=int, default=60, help="worlds per context")
    parser.add_argument("--devices", default="2,3,4", help="world sizes, used in turn")
    parser.add_argument("--fits", type=int, default=3, help="fits per world")
    parser.add_argument("--context", default="dhp,fork", help=f"comma-separated, of {CONTEXTS}")
    parser.add_argument("--world-timeout", type=float, default=240.0)
    parser.add_argument("--data-wait-timeout", type=float, default=None,
                        help="DHPStrategy(data_wait_timeout=...); default: a quarter of the world timeout, so "
                             "that the watchdog reports a stalled worker before the world is killed")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--world", help=argparse.SUPPRESS)  # internal: run one world's job from this spec
    args = parser.parse_args(argv)
    if args.world:
        run_world_job(args.world)
        return {}
    if args.quick:
        args.worlds, args.devices, args.fits = 1, "2", 1
    contexts = args.context.split(",")
    unknown = set(contexts) - set(CONTEXTS)
    if unknown:
        parser.error(f"unknown contexts {sorted(unknown)}; choose from {CONTEXTS}")
    sizes = [int(size) for size in args.devices.split(",")]
    wait = args.data_wait_timeout if args.data_wait_timeout is not None else args.world_timeout / 4
    results = {context: ContextResult(context) for context in contexts}
    started = time.perf_counter()
    for world in range(args.worlds):
        for offset in range(len(contexts)):  # rotating order: no context always runs first
            context = contexts[(world + offset) % len(contexts)]
            size = sizes[world % len(sizes)]
            outcome = run_world(results[context], size, args.fits, args.world_timeout, wait)
            print(f"world {world + 1}/{args.worlds} {context:>10} on {size} processes: {outcome}", flush=True)
    print(f"\n{args.worlds} worlds per context of {args.fits} fits each, on {args.devices} processes in turn, "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| loader start method | fits | hung /100 fits | failed /100 fits | of which stalls caught | "
          "first batch s, first fit of a process | later fits |")
    print("|---|---|---|---|---|---|---|")
    for result in results.values():
        first = [fits[0] for fits in result.first_batch_s]
        later = [seconds for fits in result.first_batch_s for seconds in fits[1:]]
        print(f"| {result.context} | {result.fits} | {result.per_100_fits(result.hung):.1f} | "
              f"{result.per_100_fits(result.failed):.1f} | {result.stalls_caught} | {_spread(first)} | "
              f"{_spread(later)} |")
    summary = {"setting": {"worlds": args.worlds, "devices": sizes, "fits_per_world": args.fits,
                           "world_timeout_s": args.world_timeout, "data_wait_timeout_s": wait,
                           "command": " ".join(sys.argv)},
               "results": {name: asdict(result) for name, result in results.items()}}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
