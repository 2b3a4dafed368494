"""The simulator's benchmark report: ``dhp-simulate``'s markdown plus the project's targets and plots.

Takes every option of ``python -m lightning_dhp.simulate`` (``--help``); ``--out DIR`` also gets
``speedup.png`` (DHP over the best static degree and over each peer), ``utilisation.png`` and
``scaling.png``.

Usage: python benchmarks/simulation_report.py --out benchmarks/results/simulation --json .../simulation.json
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.* tooling
from lightning_dhp.simulate.cli import run, write_outputs
from lightning_dhp.simulate.policies import PEERS
from lightning_dhp.simulate.report import format_markdown
from lightning_dhp.simulate.results import DeviceCountResult, DistributionResult, SimulationResult

# targets: DHP over the best static degree on the most heterogeneous distribution (the paper's 1.36x),
# per-device throughput kept from 8 to 1024 devices, planner time at 1024 devices
TARGET_SPEEDUP, TARGET_SPEEDUP_DEVICES = 1.36, 64
TARGET_SCALING, TARGET_SCALING_DEVICES = 0.95, 1024
TARGET_PLANNER_MS = 100.0


def _row_at(distribution: DistributionResult, num_devices: int) -> DeviceCountResult | None:
    return next((row for row in distribution.results if row.devices == num_devices), None)


def targets(result: SimulationResult) -> list[str]:
    """Markdown lines checking the targets above (those the simulated device counts reach)."""
    distributions = result.distributions
    most = max(distributions, key=lambda distribution: distribution.stats.cv)
    checks = []
    speedup_row = _row_at(most, TARGET_SPEEDUP_DEVICES)
    if speedup_row:
        value = speedup_row.speedup_over_best_static
        checks.append(
            f"DHP over best static at {TARGET_SPEEDUP_DEVICES} devices on {most.name} (CV "
            f"{most.stats.cv:.2f}): {value:.3f}x (target >= {TARGET_SPEEDUP}x: "
            f"{'met' if value >= TARGET_SPEEDUP else 'not met'})"
        )
        for peer in PEERS:
            checks.append(f"DHP over {peer} there: {speedup_row.speedup_over[peer]:.3f}x (target > 1)")
    scaling = [(d.name, _row_at(d, TARGET_SCALING_DEVICES)) for d in distributions]
    for name, row in scaling:
        if row and result.config.devices[0] == 8:
            value = row.scaling_efficiency.dhp
            checks.append(
                f"DHP per-device throughput at {TARGET_SCALING_DEVICES} over 8 devices on {name}: {value:.1%} "
                f"(target >= {TARGET_SCALING:.0%}: {'met' if value >= TARGET_SCALING else 'not met'})"
            )
    planner = [row.planner_ms.median for _, row in scaling if row]
    if planner:
        slowest = max(planner)
        checks.append(
            f"Planner at {TARGET_SCALING_DEVICES} devices: median {slowest:.1f} ms on the slowest distribution "
            f"(target < {TARGET_PLANNER_MS:.0f} ms: {'met' if slowest < TARGET_PLANNER_MS else 'not met'})"
        )
    if not checks:
        return []
    return ["## Targets", "", *(f"- {check}" for check in checks)]


def write_plots(result: SimulationResult, out_dir: Path) -> list[Path]:
    """speedup.png, utilisation.png and scaling.png against device count, one colour per distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # per figure: title, y label, and its lines as (line style, value of a result row); solid lines are labelled
    figures = {
        "speedup.png": (
            "DHP over the best static degree (solid), dhp-paper (dashed), megatron-dcp (dotted)",
            "speedup (x)",
            [("-", lambda row: row.speedup_over_best_static),
             ("--", lambda row: row.speedup_over["dhp-paper"]),
             (":", lambda row: row.speedup_over["megatron-dcp"])],
        ),
        "utilisation.png": (
            "Device utilisation (solid: DHP, dashed: best static)",
            "useful work / (devices x step time)",
            [("-", lambda row: row.utilisation["dhp"]),
             ("--", lambda row: row.utilisation[row.best_static])],
        ),
        "scaling.png": (
            "Per-device throughput over that at the smallest device count (solid: DHP, dashed: best static)",
            "scaling efficiency",
            [("-", lambda row: row.scaling_efficiency.dhp),
             ("--", lambda row: row.scaling_efficiency.best_static)],
        ),
    }
    paths = []
    for file_name, (title, ylabel, lines) in figures.items():
        figure, axis = plt.subplots(figsize=(7, 4.2))
        for index, distribution in enumerate(result.distributions):
            rows = distribution.results
            for style, value in lines:
                axis.plot([row.devices for row in rows], [value(row) for row in rows],
                          marker="o" if style == "-" else "x", linestyle=style, color=f"C{index % 10}",
                          label=distribution.name if style == "-" else None)
        if file_name == "speedup.png":
            axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("devices")
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / file_name
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def report(argv: Sequence[str] | None = None) -> SimulationResult:
    """Simulate as ``python -m lightning_dhp.simulate`` does; print and write the report with the targets, the
    JSON and (under ``--out``) the plots."""
    args, result = run(argv, prog="python benchmarks/simulation_report.py")
    write_outputs(args, format_markdown(result, preamble=targets(result)), result)
    if args.out:
        write_plots(result, Path(args.out))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    report(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
