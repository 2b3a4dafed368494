"""The simulator on the DHP paper's setting: every preset of ``dhp-simulate --preset`` (InternVL3-2B/8B-
and Qwen2.5-VL-7B-like language models on Ascend 910B and H100, video length distributions; the
``-vision-`` presets add the vision tower and mix the videos with text samples).

Writes ``OUT/<preset>/`` (the benchmark report with targets and plots, and its JSON) per preset, and
``OUT/presets.md`` plus ``OUT/presets.png``: DHP over the best static degree, Megatron's static
degree, dhp-paper and megatron-dcp at the largest device count, per preset and distribution, and for
the vision presets the vision-blind DHP plan (timed with the vision tower) over the vision-aware one.

Usage: python benchmarks/simulation_presets.py [--devices 16,32,64] [--steps 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.* tooling
from benchmarks import simulation_report
from lightning_dhp.simulate.config import PRESETS
from lightning_dhp.simulate.results import SimulationResult

COLUMNS = (
    ("best static", lambda row: row.speedup_over_best_static),
    ("Megatron static", lambda row: row.speedup_over_megatron),
    ("dhp-paper", lambda row: row.speedup_over["dhp-paper"]),
    ("megatron-dcp", lambda row: row.speedup_over["megatron-dcp"]),
)


def run_preset(name: str, devices: str, steps: int, out: Path) -> SimulationResult:
    """One preset through the benchmark report (report, plots and JSON under ``out / name``)."""
    folder = out / name
    with contextlib.redirect_stdout(io.StringIO()):
        return simulation_report.report(["--preset", name, "--devices", devices, "--steps", str(steps), "--out",
                                         str(folder), "--json", str(folder / "simulation.json")])


def summary(results: dict[str, SimulationResult]) -> tuple[str, list[tuple[str, list[float]]]]:
    """Markdown table and bar values: DHP over each baseline at each run's largest device count."""
    lines = ["| preset | lengths | devices | " + " | ".join(f"DHP / {label}" for label, _ in COLUMNS)
             + " | DHP / bound | DHP rounds |", "|---|---|---:|" + "---:|" * (len(COLUMNS) + 2)]
    bars = []
    for name, result in results.items():
        for distribution in result.distributions:
            row = distribution.results[-1]
            values = [value(row) for _, value in COLUMNS]
            bars.append((f"{name}\n{distribution.name}", values))
            lines.append(f"| {name} | {distribution.name} | {row.devices} | "
                         + " | ".join(f"{value:.3f}" for value in values)
                         + f" | {row.step_time_s['dhp'] / row.lower_bound_s:.3f} | {row.dhp_rounds:.1f} |")
    return "\n".join(lines) + "\n", bars


def vision_summary(results: dict[str, SimulationResult]) -> str:
    """Markdown table of the vision presets: vision-blind over vision-aware DHP per step at the largest device
    count (empty without vision presets)."""
    lines = ["| preset | lengths | devices | steps | blind / aware median | p10 | p90 | min | max |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        for distribution in result.distributions:
            row = distribution.results[-1]
            if row.vision_blind_over_aware is not None:
                ratios = row.vision_blind_over_aware
                lines.append(f"| {name} | {distribution.name} | {row.devices} | {row.steps} | "
                             + " | ".join(f"{ratio:.3f}" for ratio in
                                          (ratios.median, ratios.p10, ratios.p90, ratios.min, ratios.max))
                             + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def plot(bars: list[tuple[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(max(8, 0.9 * len(bars)), 4.5))
    positions = np.arange(len(bars))
    width = 0.8 / len(COLUMNS)
    for index, (label, _) in enumerate(COLUMNS):
        axis.bar(positions + (index - (len(COLUMNS) - 1) / 2) * width, [values[index] for _, values in bars], width,
                 label=f"DHP / {label}")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    lowest = min(min(values) for _, values in bars)
    axis.set_ylim(min(0.95, lowest - 0.02), max(max(values) for _, values in bars) + 0.03)
    axis.set_xticks(positions, [label for label, _ in bars], fontsize=6, rotation=60, ha="right")
    axis.set_ylabel("speedup (predicted step time ratio)")
    axis.set_title("DHP over each baseline in the paper's setting (largest simulated device count)", fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="16,32,64", help="device counts (default %(default)s; the paper: <= 64)")
    parser.add_argument("--steps", type=int, default=8, help="global batches per device count (default %(default)s)")
    parser.add_argument("--out", default="benchmarks/results/simulation_presets", help="output folder")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: all")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = {}
    for name in args.preset or sorted(PRESETS):
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = run_preset(name, args.devices, args.steps, out)
    table, bars = summary(results)
    vision = vision_summary(results)
    if vision:
        vision = ("\nVision presets: the DHP plan made without the vision patches, timed with them, over the plan "
                  f"made with them (per step):\n\n{vision}")
    (out / "presets.md").write_text(
        f"# DHP in the paper's setting\n\n`python benchmarks/simulation_presets.py --devices {args.devices} "
        f"--steps {args.steps}`; per preset: `{args.out}/<preset>/simulation.md`.\n\n{table}{vision}"
    )
    plot(bars, out / "presets.png")
    print(table + vision, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
