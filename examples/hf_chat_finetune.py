"""Fine-tune a Hugging Face Qwen-VL model under DHP on a chat manifest of videos and images.

    python examples/hf_chat_finetune.py                                 # generated clips/images, 4 CPU processes
    python examples/hf_chat_finetune.py trainer.devices=2 trainer.max_steps=40
    python examples/hf_chat_finetune.py data.manifest=/data/train.jsonl data.media_root=/data/media \\
        chat_model=qwen3_vl_2b trainer=gpu                              # your data, a released checkpoint

Token counts come from the files' headers (``ChatDataset``, cached beside the manifest); each rank decodes only
the frames and images its vision units need. Configuration: lightning_dhp/conf/hf_chat_finetune.yaml. Prints
the held-out first-answer-token accuracy before and after training and writes summary.json to Hydra's output
directory and prints a summary table.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from omegaconf import DictConfig
from torch.utils.data import Subset

import lightning_dhp
from lightning_dhp import DHPDataModule
from lightning_dhp.app.cost_model_cache import uncached_choice
from lightning_dhp.app.quiet_warnings import ignore_lightning_pytree_warning
from lightning_dhp.app.report import cost_model_rows, degrees_used, fit_with_plan_report, format_table, step_time_rows
from lightning_dhp.hf import ChatDataset, HFModule
from lightning_dhp.hf.chat_digits import answer_accuracy, write_chat_digits

CONF_DIR = Path(lightning_dhp.__file__).resolve().parent / "conf"


def manifest_path(cfg: DictConfig) -> Path:
    """The user's manifest, or the generated one (written on first use)."""
    if cfg.data.manifest is not None:
        return Path(cfg.data.manifest)
    sizes, durations = tuple(cfg.data.frame_sizes), tuple(cfg.data.durations_s)
    name = f"seed{cfg.seed}_{cfg.data.num_videos}v{cfg.data.num_images}i_{'-'.join(map(str, sizes))}px_" \
           f"{'-'.join(map(str, durations))}s"
    directory = Path(cfg.data.cache_dir) / name
    manifest = directory / "manifest.jsonl"
    if not manifest.exists():
        print(f"writing the generated chat dataset to {directory}", flush=True)
        write_chat_digits(directory, cfg.data.num_videos, cfg.data.num_images, seed=cfg.seed, frame_sizes=sizes,
                          durations_s=durations)
    return manifest


@hydra.main(config_path=str(CONF_DIR), config_name="hf_chat_finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    ignore_lightning_pytree_warning()
    seed_everything(cfg.seed, verbose=False)
    processor = instantiate(cfg.chat_model.processor)
    dataset = ChatDataset(manifest_path(cfg), processor, media_root=cfg.data.media_root,
                          skip_bad_samples=cfg.data.skip_bad_samples)
    train = list(range(len(dataset) - cfg.data.num_eval))
    held_out = list(range(len(train), len(dataset)))
    optimizer = partial(torch.optim.AdamW, lr=cfg.chat_model.lr, weight_decay=cfg.chat_model.weight_decay)
    module = HFModule(instantiate(cfg.chat_model.model), optimizer=optimizer)
    data = DHPDataModule(Subset(dataset, train), [dataset.lengths[i] for i in train], cfg.data.global_batch_size,
                         vision_patches=[dataset.vision_patches[i] for i in train], num_workers=cfg.data.num_workers,
                         seed=cfg.seed, **module.packing_options)
    trainer, report, output_dir = fit_with_plan_report(cfg, module, data)
    if not trainer.is_global_zero:
        return
    untrained = HFModule(instantiate(cfg.chat_model.model).to(module.device))
    summary = {"steps": trainer.global_step, "devices": trainer.world_size, "records": len(dataset),
               "skipped_records": dataset.skipped, "loss_first": report.losses[0], "loss_last": report.losses[-1],
               "accuracy_before": answer_accuracy(untrained, dataset, held_out),
               "accuracy_after": answer_accuracy(module, dataset, held_out), "eval_records": len(held_out),
               "plan": report.summary}
    path = output_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    plan = report.summary
    print(format_table([
        ("devices, optimizer steps", f"{summary['devices']}, {summary['steps']}"),
        ("records (skipped)", f"{summary['records']} ({summary['skipped_records']})"),
        ("train loss first -> last step", f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f}"),
        ("first answer token accuracy", f"{summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%} "
                                        f"({len(held_out)} held-out records)"),
        ("groups used, by CP degree", degrees_used(plan)),
        *step_time_rows(plan),
        *cost_model_rows(asdict(uncached_choice(cfg.strategy.cost_model))),
        ("summary", str(path)),
    ], "hf_chat_finetune"), flush=True)


if __name__ == "__main__":
    main()
