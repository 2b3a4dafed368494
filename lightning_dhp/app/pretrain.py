"""The fine-tuning run's starting point: the same model pretrained on short single-image samples.

Produced once per configuration by a short single-process run and cached on disk, keyed by a hash
of everything that shapes it, so reruns (and every rank of a run) load the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.models.vlm_task import VLMTask, fit_single_process


def pretrained_checkpoint(model: Mapping[str, Any], *, steps: int, samples_per_step: int, lr: float,
                          num_samples: int, seed: int, frame_sizes: list[int], cache_dir: str | os.PathLike,
                          log: Any = print) -> Path:
    """Path of the pretrained ``TinyVLM`` state dict for these settings, training it if not cached."""
    recipe = {"model": dict(model), "steps": steps, "samples_per_step": samples_per_step, "lr": lr,
              "num_samples": num_samples, "seed": seed, "frame_sizes": list(frame_sizes), "version": 1}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"tiny_vlm_pretrained_{key}.pt"
    if path.exists():
        return path
    log(f"Pretraining the starting checkpoint on single images ({steps} steps, one process) -> {path}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    task = VLMTask(dict(model), lr=lr)  # default warmup
    dataset = VideoDigits.single_image(num_samples, seed=seed + 1000, frame_sizes=frame_sizes)
    losses = fit_single_process(task, dataset, steps, samples_per_step, seed=seed)
    log(f"  pretraining loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
        f"in {time.perf_counter() - started:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(task.model.state_dict(), partial)
    partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return path
