"""Pictures of plans: which ranks ran which group, at which degree, for how long."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_dhp.planner import Plan


def draw_plans(plans: Sequence[Plan], path: str | Path, *, measured_seconds: Sequence[float] | None = None,
               titles: Sequence[str] | None = None) -> Path:
    """Save a Gantt chart of ``plans`` (one panel per step) as a PNG and return its path.

    Each box is a group: its height spans the group's ranks, its width the group's predicted time,
    its colour and label the CP degree; rounds follow each other left to right. Panel titles give the
    predicted and, where known, the measured step time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    degrees = sorted({group.degree for plan in plans for round_ in plan.rounds for group in round_.groups})
    colours = plt.get_cmap("viridis", max(len(degrees), 2))
    colour_of = {degree: colours(index) for index, degree in enumerate(degrees)}
    figure, axes = plt.subplots(1, len(plans), figsize=(3.4 * len(plans), 0.5 * plans[0].num_devices + 2),
                                squeeze=False, sharey=True)
    for index, (plan, axis) in enumerate(zip(plans, axes[0], strict=True)):
        start = 0.0
        for round_ in plan.rounds:
            for group in round_.groups:
                axis.add_patch(Rectangle((start, group.ranks[0] - 0.45), group.predicted_time, group.degree - 0.1,
                                         facecolor=colour_of[group.degree], edgecolor="white", linewidth=1.0))
                if group.predicted_time > 0.12 * plan.predicted_time:
                    axis.text(start + group.predicted_time / 2, group.ranks[0] + (group.degree - 1) / 2,
                              f"d={group.degree}\n{len(group.samples)}", ha="center", va="center", fontsize=7,
                              color="black" if sum(colour_of[group.degree][:3]) > 1.8 else "white")
            start += round_.predicted_time
        axis.set_xlim(0, plan.predicted_time * 1.02)
        axis.set_ylim(plan.num_devices - 0.5, -0.5)
        axis.set_xlabel("predicted seconds")
        title = titles[index] if titles else f"step {index}"
        timing = f"predicted {plan.predicted_time:.3g} s"
        if measured_seconds is not None:
            timing += f", measured {measured_seconds[index]:.3g} s"
        axis.set_title(f"{title}\n{len(plan.rounds)} rounds, {timing}", fontsize=8)
    axes[0][0].set_ylabel("rank")
    axes[0][0].set_yticks(range(plans[0].num_devices))
    figure.legend(handles=[Patch(color=colour_of[d], label=f"CP degree {d}") for d in degrees],
                  loc="lower center", ncol=len(degrees), fontsize=8, frameon=False)
    figure.suptitle("DHP plans: one box per CP group (label: degree, samples), rounds left to right", fontsize=10)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
