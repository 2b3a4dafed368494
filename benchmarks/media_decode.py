"""Per-rank video decoding: decode time and pixel memory of each rank of a CP group on one long video.

A generated H.264 clip (``--seconds`` at 30 fps, 320 x 240, a keyframe every second) is one record of a
``ChatDataset`` for a tiny Qwen3-VL processor (2 frames per second sampled, frames resized to at most 224 x 224
px, 16 px patches). For degree ``d`` and each rank ``r < d``, the benchmark runs what rank ``r``'s loader runs
once its group is planned (the family's ``transform_group``: decode the frames of the temporal patches ``r``
encodes and process them at the whole video's size) and records its wall time and the bytes of the pixel rows
it holds. The whole video processed at once (``ChatDataset.processed``: every sampled frame decoded) is the
reference. Degrees run interleaved, the order rotating every repeat; the table gives, per degree, the slowest
rank's time and the largest rank's pixel memory (median over repeats, min-max), each over degree 1's.

Usage: python benchmarks/media_decode.py [--quick] [--seconds 60] [--degrees 1,2,4] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lightning_dhp.attention import ZigzagLayout
from lightning_dhp.hf import ChatDataset
from lightning_dhp.hf.chat_digits import tiny_model, tiny_processor, write_video
from lightning_dhp.hf.families import family_of
from lightning_dhp.lightning import DHPPacking
from lightning_dhp.simulate.provenance import stamp

FPS, HEIGHT, WIDTH = 30, 240, 320


def write_long_video(directory: Path, seconds: int) -> Path:
    """A clip of moving noise bands (so every frame differs) and its one-record manifest."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    frames = [np.roll(base, 4 * index, axis=1) for index in range(seconds * FPS)]
    write_video(directory / "long.mp4", frames, FPS, gop_size=FPS, lossless=False)  # decodes as real clips do
    record = {"messages": [{"role": "user", "content": [{"type": "video", "video": "long.mp4"},
                                                        {"type": "text", "text": "Which digit?"}]},
                           {"role": "assistant", "content": "7"}]}
    manifest = directory / "manifest.jsonl"
    manifest.write_text(json.dumps(record) + "\n")
    return manifest


def rank_load(dataset: ChatDataset, family, degree: int, rank: int) -> tuple[float, int]:
    """Seconds and pixel bytes of rank ``rank``'s loading of the record's pixels at ``degree``."""
    item = family(dataset[0])
    layout = ZigzagLayout([len(item["input_ids"])], degree, rank)
    batch = DHPPacking(family.token_fields).collate_group([item], layout)
    started = time.perf_counter()
    family.transform_group(batch, layout)
    seconds = time.perf_counter() - started
    rows = batch["pixel_values_videos"][0]
    return seconds, sum(block.numel() * block.element_size() for block in rows.blocks.values())


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="a 6 s clip, degrees 1 and 2, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.degrees, args.repeats = 6, "1,2", 1
    degrees = [int(degree) for degree in args.degrees.split(",")]
    command = " ".join(["python", "benchmarks/media_decode.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as directory:
        manifest = write_long_video(Path(directory), args.seconds)
        processor = tiny_processor("qwen3_vl", patch_size=16, max_pixels=224 * 224)
        dataset = ChatDataset(manifest, processor, progress=False)
        family = family_of(tiny_model("qwen3_vl", patch_size=16))
        grid = dataset[0]["video_grid_thw"][0].tolist()
        timings: dict[int, list[float]] = {degree: [] for degree in degrees}
        memory: dict[int, list[float]] = {degree: [] for degree in degrees}
        whole: list[float] = []
        for repeat in range(args.repeats):
            for degree in degrees[repeat % len(degrees):] + degrees[:repeat % len(degrees)]:
                loads = [rank_load(dataset, family, degree, rank) for rank in range(degree)]
                timings[degree].append(max(seconds for seconds, _ in loads))
                memory[degree].append(max(size for _, size in loads))
            started = time.perf_counter()
            pixels = dataset.processed(0)["pixel_values_videos"]
            whole.append(time.perf_counter() - started)
    rows = [{"degree": degree, "slowest_rank_s": spread(timings[degree]), "largest_rank_mb": spread(
                [size / 2**20 for size in memory[degree]]),
             "time_over_degree_1": statistics.median(timings[degree]) / statistics.median(timings[degrees[0]]),
             "memory_over_degree_1": statistics.median(memory[degree]) / statistics.median(memory[degrees[0]])}
            for degree in degrees]
    results = {"command": command, **stamp(),
               "video": {"seconds": args.seconds, "fps": FPS, "size": [WIDTH, HEIGHT], "grid_thw": grid},
               "whole_video_processed_s": spread(whole), "whole_video_mb": pixels.numel() * 4 / 2**20, "rows": rows}
    print(f"{command}\n{results['machine']}\nvideo: {args.seconds} s, grid (t, h, w) {grid}; whole video processed "
          f"in {statistics.median(whole):.2f} s, {results['whole_video_mb']:.1f} MB of pixel rows")
    print("\n| degree | slowest rank s (median, min-max) | over degree 1 | largest rank MB | over degree 1 |")
    print("|---|---|---|---|---|")
    for row in rows:
        time_s, size = row["slowest_rank_s"], row["largest_rank_mb"]
        print(f"| {row['degree']} | {time_s['median']:.3f} ({time_s['min']:.3f}-{time_s['max']:.3f}) | "
              f"{row['time_over_degree_1']:.2f} | {size['median']:.1f} | {row['memory_over_degree_1']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
