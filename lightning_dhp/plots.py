"""Pictures of plans: which ranks ran which group, at which degree, for how long."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_dhp.planner import Plan


def draw_plans(plans: Sequence[Plan], path: str | Path, *, measured_seconds: Sequence[float] | None = None,
               titles: Sequence[str] | None = None) -> Path:
    """Save a Gantt chart of ``plans`` (one panel per step) as a PNG and return its path.

    Each box is a group: its height spans the group's ranks, its width the group's predicted time,
    its colour the CP degree; rounds follow each other left to right. A dashed line marks the
    measured step time where given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    max_degree = max(group.degree for plan in plans for round_ in plan.rounds for group in round_.groups)
    colours = plt.get_cmap("viridis", max(max_degree, 2))
    figure, axes = plt.subplots(1, len(plans), figsize=(3.2 * len(plans), 3.6), squeeze=False, sharey=True)
    for index, (plan, axis) in enumerate(zip(plans, axes[0], strict=True)):
        start = 0.0
        for round_index, round_ in enumerate(plan.rounds):
            for group in round_.groups:
                axis.add_patch(Rectangle((start, group.ranks[0] - 0.45), group.predicted_time, group.degree - 0.1,
                                         facecolor=colours(group.degree - 1), edgecolor="black", linewidth=0.6))
                axis.text(start + group.predicted_time / 2, group.ranks[0] + (group.degree - 1) / 2,
                          f"d={group.degree}\n{len(group.samples)} seq", ha="center", va="center", fontsize=7,
                          color="white" if group.degree < max_degree / 2 + 1 else "black")
            start += round_.predicted_time
            if round_index < len(plan.rounds) - 1:
                axis.axvline(start, color="grey", linewidth=0.8, linestyle=":")
        end = start
        if measured_seconds is not None:
            axis.axvline(measured_seconds[index], color="red", linestyle="--", linewidth=1.0, label="measured")
            end = max(end, measured_seconds[index])
        axis.set_xlim(0, end * 1.05)
        axis.set_ylim(plan.num_devices - 0.5, -0.5)
        axis.set_xlabel("predicted seconds")
        axis.set_title(titles[index] if titles else f"step {index}", fontsize=9)
    axes[0][0].set_ylabel("rank")
    axes[0][0].set_yticks(range(plans[0].num_devices))
    if measured_seconds is not None:
        axes[0][-1].legend(loc="lower right", fontsize=7)
    figure.suptitle("DHP plans: groups per round (colour and label: CP degree)", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
