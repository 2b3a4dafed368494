"""Vision work across a CP group: the busiest rank over the mean, one owner per video against the split.

A Hugging Face Qwen2.5-VL built from a config (float32) trains under ``DHPStrategy(static_degree=d)`` on
``d`` gloo CPU processes, so every global batch is one CP group of degree ``d``. Two variants of the same
step, each a fresh ``HFModule``:

- **one owner**: ``HFModule(split_videos=False)``: each image and video is encoded whole by one rank of the
  group (what lightning-dhp did before), the others wait for its features;
- **split**: ``HFModule()``: images and every video temporal patch spread over the group's ranks by
  predicted cost.

Per step and rank the benchmark records the process CPU time of the training step (forward, backward and
the gradient sum: a rank waiting for a peer's features sleeps in a receive), and the step's wall time. It
reports, per batch and degree, the busiest rank's CPU time over the ranks' mean (1.0 is perfect balance;
the median over steps, and its min-max), and the median wall time. The variants run interleaved, the order
rotating every repeat. The tiny VLM of the main job (``lightning_dhp.models``), which encodes on each rank
the frames whose tokens it holds, is measured the same way.

The configuration keeps the 7B model's ratio of vision-tower to language-model work per visual token
(:func:`work_ratio`, from the weights each patch and each token multiply, as the planner's cost model
counts them: ``lightning_dhp.planner.presets``): 0.36 for Qwen2.5-VL-7B (its presets: 643M weights per
patch, 4 patches per visual token, against the language model's 7.1B per token), 0.35 for this
configuration. Attention, which grows with the context, is left out of both.

Batches: "one long video" (8 x 16 x 16 patches = 512 visual tokens and 64 text tokens, the case of the
issue that asked for this) and "mixed" (two videos of 3 and 5 temporal patches and three images).
Usage: python benchmarks/vision_balance.py [--quick] [--degrees 2,4] [--repeats 3] [--steps 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lightning_dhp import DHPDataModule, DHPStrategy
from lightning_dhp.data.video_digits import VideoDigits
from lightning_dhp.hf import HFModule
from lightning_dhp.models import VLMTask
from lightning_dhp.models.tiny_vlm import TinyVLMConfig
from lightning_dhp.planner.presets import MODEL_PRESETS, VISION_PRESETS, TransformerShape, VisionShape
from lightning_dhp.simulate.provenance import stamp
from lightning_dhp.testing import run_distributed

VOCAB, IMAGE, VIDEO, START, END = 256, 250, 251, 252, 253
PATCH = 14
TEXT = {"vocab_size": VOCAB, "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": None,
        "pad_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 8, 8]}}
VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 96, "num_heads": 4, "patch_size": PATCH,
          "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3, "out_hidden_size": 192,
          "window_size": 112, "fullatt_block_indexes": [1]}
BATCHES = {
    "one long video": {"videos": [(8, 16, 16)], "images": [], "text": 64},
    "mixed": {"videos": [(3, 8, 8), (5, 12, 8)], "images": [(8, 8), (12, 16), (4, 8)], "text": 32},
}


def qwen25_vl() -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE, video_token_id=VIDEO,
                              vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


def work_ratio(language: TransformerShape, vision: VisionShape) -> float:
    """Vision-tower over language-model linear work per visual token: ``merge_size**2`` patches through the
    tower against one token through the language model."""
    return vision.merge_size**2 * vision.weights_per_patch / language.matmul_weights_per_token


SEVEN_B_RATIO = work_ratio(MODEL_PRESETS["qwen2.5-vl-7b"], VISION_PRESETS["qwen2.5-vl-7b"])  # the planner's presets


def tiny_work_ratio() -> float:
    config = qwen25_vl().config
    return work_ratio(TransformerShape.from_config(config), VisionShape.from_config(config))


def sample(grids: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """One sample as a Qwen2.5-VL processor returns it: text, then each image and video between start/end."""
    generator = torch.Generator().manual_seed(seed)
    patch_dim = 3 * 2 * PATCH * PATCH
    tokens = [torch.randint(0, 200, (grids["text"],), generator=generator)]
    item: dict[str, torch.Tensor] = {}
    for kind, token, key, grid_key in (("images", IMAGE, "pixel_values", "image_grid_thw"),
                                       ("videos", VIDEO, "pixel_values_videos", "video_grid_thw")):
        shapes = [(1, *shape) if kind == "images" else shape for shape in grids[kind]]
        if not shapes:
            continue
        for t, h, w in shapes:
            tokens.append(torch.tensor([START] + [token] * (t * h * w // 4) + [END]))
        item[key] = torch.randn(sum(t * h * w for t, h, w in shapes), patch_dim, generator=generator)
        item[grid_key] = torch.tensor(shapes)
    item["input_ids"] = torch.cat(tokens)
    return item


class StepClock(Callback):
    """Process CPU time and wall time of every training step on this rank."""

    def __init__(self) -> None:
        self.cpu_s: list[float] = []
        self.wall_s: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = (time.process_time(), time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.cpu_s.append(time.process_time() - self._started[0])
        self.wall_s.append(time.perf_counter() - self._started[1])


def _fit(module: Any, data: DHPDataModule, degree: int, steps: int, tokens_per_device: int) -> StepClock:
    clock = StepClock()
    trainer = Trainer(accelerator="cpu", devices=degree, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[clock], strategy=DHPStrategy(tokens_per_device, static_degree=degree))
    trainer.fit(module, datamodule=data)
    return clock


def _hf_run(split: bool, batch: str, degree: int, steps: int) -> StepClock:
    module = HFModule(qwen25_vl(), split_videos=split)
    items = [sample(BATCHES[batch], seed=step) for step in range(steps)]
    lengths = [len(item["input_ids"]) for item in items]
    data = DHPDataModule(items, lengths, 1, shuffle=False, **module.packing_options)
    return _fit(module, data, degree, steps, tokens_per_device=max(lengths))


def _tiny_vlm_run(batch: str, degree: int, steps: int) -> StepClock:
    """The main job's tiny VLM on one video per step with as many visual tokens as the HF batch's video:
    8 frames of 8 x 8 patches (its tokens are unmerged patches)."""
    videos = VideoDigits(steps, num_frames=8, frame_sizes=(64,))
    torch.manual_seed(0)
    task = VLMTask(TinyVLMConfig(), warmup_steps=0)
    data = DHPDataModule(videos, videos.lengths.tolist(), 1, shuffle=False)
    return _fit(task, data, degree, steps, tokens_per_device=int(videos.lengths.max()))


VARIANTS = {"one owner": lambda batch, degree, steps: _hf_run(False, batch, degree, steps),
            "split": lambda batch, degree, steps: _hf_run(True, batch, degree, steps),
            "tiny VLM": lambda batch, degree, steps: _tiny_vlm_run(batch, degree, steps)}


def measure(rank: int, degree: int, repeats: int, steps: int, variants: list[str]) -> list[dict[str, Any]]:
    """On every rank: each batch and variant once per repeat, in rotating order; this rank's clocks."""
    import os

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    torch.set_num_threads(1)
    records = []
    runs = [(batch, variant) for batch in BATCHES for variant in variants
            if variant != "tiny VLM" or batch == "one long video"]
    for repeat in range(repeats):
        for offset in range(len(runs)):
            batch, variant = runs[(repeat + offset) % len(runs)]
            clock = VARIANTS[variant](batch, degree, steps)
            records.append({"repeat": repeat, "batch": batch, "variant": variant, "cpu_s": clock.cpu_s,
                            "wall_s": clock.wall_s})
    return records


def summarise(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per batch and variant: busiest rank over the mean (per step), and wall time, over repeats and steps."""
    groups: dict[tuple[str, str], list[tuple[list[float], float]]] = {}
    for runs in zip(*per_rank, strict=True):
        for step in range(len(runs[0]["cpu_s"])):
            times = [run["cpu_s"][step] for run in runs]
            wall = max(run["wall_s"][step] for run in runs)
            groups.setdefault((runs[0]["batch"], runs[0]["variant"]), []).append((times, wall))
    rows = []
    for (batch, variant), steps in groups.items():
        ratios = [max(times) / statistics.mean(times) for times, _ in steps]
        rows.append({"batch": batch, "variant": variant, "busiest_over_mean": _spread(ratios),
                     "busiest_cpu_s": _spread([max(times) for times, _ in steps]),
                     "wall_s": _spread([wall for _, wall in steps]), "steps": len(steps)})
    return rows


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="degree 2, one repeat of one step, no tiny VLM")
    parser.add_argument("--degrees", default="2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="training steps per run (one global batch each)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    degrees = [2] if args.quick else [int(degree) for degree in args.degrees.split(",")]
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    variants = ["one owner", "split"] + ([] if args.quick else ["tiny VLM"])
    ratio = tiny_work_ratio()
    command = " ".join(["python", "benchmarks/vision_balance.py", *sys.argv[1:]])
    print(f"{command}\nvision/LLM work per visual token: {ratio:.2f} (Qwen2.5-VL-7B: {SEVEN_B_RATIO:.2f})", flush=True)
    results = {"command": command, **stamp(), "work_ratio": ratio, "seven_b_ratio": SEVEN_B_RATIO, "rows": []}
    for degree in degrees:
        per_rank = run_distributed(measure, degree, repeats, steps, variants, timeout_s=1800)
        for row in summarise(per_rank):
            results["rows"].append({"degree": degree, **row})
    print("\n| degree | batch | variant | busiest / mean CPU (median, min-max) | busiest rank CPU s | step wall s |")
    print("|---|---|---|---|---|---|")
    for row in results["rows"]:
        ratio_spread, busiest, wall = row["busiest_over_mean"], row["busiest_cpu_s"], row["wall_s"]
        print(f"| {row['degree']} | {row['batch']} | {row['variant']} | {ratio_spread['median']:.2f} "
              f"({ratio_spread['min']:.2f}-{ratio_spread['max']:.2f}) | {busiest['median']:.3f} | "
              f"{wall['median']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
