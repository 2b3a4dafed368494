"""Fine-tune a Hugging Face Qwen-VL-architecture model on the video-digits task under DHP.

    python examples/hf_vlm_finetune.py                                   # 4 CPU processes, tiny Qwen3-VL
    python examples/hf_vlm_finetune.py trainer.devices=2 trainer.max_steps=50
    python examples/hf_vlm_finetune.py hf_model=tiny_qwen2_vl            # a tiny Qwen2-VL instead
    python examples/hf_vlm_finetune.py hf_model=qwen3_vl_2b trainer=gpu  # a released checkpoint (see its config)

Configuration: lightning_dhp/conf/hf_vlm_finetune.yaml (model configs in conf/hf_model/). Prints the
held-out answer accuracy before and after training and writes summary.json to Hydra's output directory.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from omegaconf import DictConfig
from torch.utils.data import ConcatDataset

import lightning_dhp
from lightning_dhp import DHPDataModule
from lightning_dhp.app.quiet_warnings import ignore_lightning_pytree_warning
from lightning_dhp.app.report import fit_with_plan_report
from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.hf import HFModule
from lightning_dhp.hf.video_digits import QwenVLVideoDigits, answer_accuracy

CONF_DIR = Path(lightning_dhp.__file__).resolve().parent / "conf"


def datasets(cfg: DictConfig, config) -> tuple[QwenVLVideoDigits, QwenVLVideoDigits, QwenVLVideoDigits]:
    """Single frames, videos and held-out videos (different seeds), as Qwen-VL items for ``config``."""
    vision = config.vision_config
    common = {"frame_sizes": list(cfg.data.frame_sizes), "patch_size": vision.patch_size * vision.spatial_merge_size}
    videos = {"sample_fps": cfg.data.sample_fps, "max_frames": cfg.data.max_frames, "data_dir": cfg.data.data_dir,
              "metadata_file": cfg.data.metadata_file, **common}
    return (QwenVLVideoDigits(VideoDigits.single_image(cfg.data.num_images, seed=cfg.seed, **common), config),
            QwenVLVideoDigits(VideoDigits(cfg.data.num_videos, seed=cfg.seed + 1, **videos), config),
            QwenVLVideoDigits(VideoDigits(cfg.data.num_eval, seed=cfg.seed + 2, **videos), config))


@hydra.main(config_path=str(CONF_DIR), config_name="hf_vlm_finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    ignore_lightning_pytree_warning()
    seed_everything(cfg.seed, verbose=False)
    optimizer = partial(torch.optim.AdamW, lr=cfg.hf_model.lr, weight_decay=cfg.hf_model.weight_decay)
    module = HFModule(instantiate(cfg.hf_model.model), optimizer=optimizer)
    images, videos, held_out = datasets(cfg, module.model.config)
    data = DHPDataModule(ConcatDataset([images, videos]), [*images.lengths.tolist(), *videos.lengths.tolist()],
                         cfg.data.global_batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed,
                         **module.packing_options)
    trainer, report, output_dir = fit_with_plan_report(cfg, module, data)
    if not trainer.is_global_zero:
        return
    summary = {"steps": trainer.global_step, "devices": trainer.world_size,
               "loss_first": report.losses[0], "loss_last": report.losses[-1],
               "accuracy_before": answer_accuracy(HFModule(instantiate(cfg.hf_model.model).to(module.device)),
                                                  held_out),
               "accuracy_after": answer_accuracy(module, held_out), "eval_samples": len(held_out),
               "plan": report.summary}
    path = output_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({key: value for key, value in summary.items() if key != "plan"}), f"-> {path}", flush=True)


if __name__ == "__main__":
    main()
