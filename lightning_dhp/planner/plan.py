"""The plan of one global batch: rounds of disjoint context-parallel groups, and its checks."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from lightning_dhp.errors import PlanError
from lightning_dhp.planner.cost_model import padded_length
from lightning_dhp.planner.memory import vision_budget
from lightning_dhp.planner.placement import needlessly_crosses_node


@dataclass(frozen=True)
class Group:
    """``samples`` run together on the contiguous ``ranks`` at CP degree ``len(ranks)``.

    ``samples`` index into the plan's lengths, in the packing order the collate uses.
    ``tokens_per_rank`` is the padded per-device token count.
    """

    ranks: tuple[int, ...]
    samples: tuple[int, ...]
    predicted_time: float
    tokens_per_rank: int

    @property
    def degree(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Round:
    """One micro-step: groups that run side by side (each rank in at most one group)."""

    groups: tuple[Group, ...]

    @property
    def predicted_time(self) -> float:
        return max(group.predicted_time for group in self.groups)


@dataclass(frozen=True)
class Plan:
    """Rounds of one global batch; frozen and picklable (it travels through DataLoader queues)."""

    rounds: tuple[Round, ...]
    lengths: tuple[int, ...]
    num_devices: int
    tokens_per_device: int
    predicted_time: float
    lower_bound: float
    node_size: int | None = None
    vision_patches: tuple[int, ...] | None = None  # per sample, what the times include; None: no vision work
    vision_patches_per_device: int | None = None  # the vision memory budget the plan respects; None: none

    def group_for(self, round_index: int, rank: int) -> Group | None:
        """The group ``rank`` belongs to in round ``round_index``, or None when it idles."""
        for group in self.rounds[round_index].groups:
            if group.ranks[0] <= rank <= group.ranks[-1]:
                return group
        return None

    def validate(self) -> None:
        """Raise :class:`PlanError` naming the first broken rule (see the module rules)."""
        seen: dict[int, int] = {}
        for round_index, round_ in enumerate(self.rounds):
            if not round_.groups:
                raise PlanError(f"round {round_index} has no groups; drop empty rounds")
            used: set[int] = set()
            for group in round_.groups:
                where = f"round {round_index} group at ranks {group.ranks}"
                _check_ranks(group, self.num_devices, where)
                if used.intersection(group.ranks):
                    raise PlanError(
                        f"{where} overlaps another group of that round on ranks "
                        f"{sorted(used.intersection(group.ranks))}"
                    )
                used.update(group.ranks)
                if self.node_size and needlessly_crosses_node(group.ranks[0], group.degree, self.node_size):
                    raise PlanError(
                        f"{where} fits in one node of {self.node_size} ranks but crosses "
                        f"nodes {group.ranks[0] // self.node_size} and {group.ranks[-1] // self.node_size}"
                    )
                if not group.samples:
                    raise PlanError(f"{where} holds no samples")
                for sample in group.samples:
                    if not 0 <= sample < len(self.lengths):
                        raise PlanError(f"{where} names sample {sample}, outside 0..{len(self.lengths) - 1}")
                    if sample in seen:
                        raise PlanError(f"sample {sample} appears in round {seen[sample]} and again in {where}")
                    seen[sample] = round_index
                padded = sum(padded_length(self.lengths[sample], group.degree) for sample in group.samples)
                if padded != group.tokens_per_rank * group.degree:
                    raise PlanError(
                        f"{where}: tokens_per_rank={group.tokens_per_rank} but its samples "
                        f"occupy {padded} padded tokens over {group.degree} ranks"
                    )
                if group.tokens_per_rank > self.tokens_per_device:
                    raise PlanError(
                        f"{where} needs {group.tokens_per_rank} tokens per rank, over "
                        f"tokens_per_device={self.tokens_per_device}"
                    )
        patches = self.vision_patches
        if patches is not None and (len(patches) != len(self.lengths) or min(patches, default=0) < 0):
            raise PlanError(
                f"vision_patches holds {len(patches)} counts (min {min(patches, default=0)}) for "
                f"{len(self.lengths)} samples; give one count >= 0 per sample"
            )
        budget = vision_budget(patches, self.vision_patches_per_device)
        if budget is not None:
            self._check_vision_budget(patches, budget)
        missing = sorted(set(range(len(self.lengths))) - set(seen))
        if missing:
            raise PlanError(f"samples {missing[:10]} (of {len(missing)} missing) appear in no group")
        total = math.fsum(round_.predicted_time for round_ in self.rounds)
        if not math.isclose(total, self.predicted_time, rel_tol=1e-9, abs_tol=1e-12):
            raise PlanError(f"predicted_time={self.predicted_time} but its rounds sum to {total}")
        if self.lower_bound > self.predicted_time * (1 + 1e-9):
            raise PlanError(f"lower_bound={self.lower_bound} exceeds predicted_time={self.predicted_time}")

    def _check_vision_budget(self, patches: tuple[int, ...], budget: int) -> None:
        """PlanError for the first group whose vision patches exceed its degree x ``budget``."""
        for round_index, round_ in enumerate(self.rounds):
            for group in round_.groups:
                held = sum(patches[sample] for sample in group.samples)
                if held > group.degree * budget:
                    raise PlanError(
                        f"round {round_index} group at ranks {group.ranks} holds {held} vision patches, over "
                        f"{group.degree} x vision_patches_per_device={budget}"
                    )

    def digest(self) -> str:
        """Stable hex digest of the plan's structure (inputs, rounds, ranks, samples).

        Predicted times are left out, so the digest does not depend on float rounding: the same
        assignment gives the same digest in every process and on every machine. Vision patches are
        part of the inputs only when the plan has some (a text-only plan's digest is unchanged), and the
        vision budget only when it is set.
        """
        canonical: dict[str, object] = {
            "lengths": list(self.lengths),
            "num_devices": self.num_devices,
            "tokens_per_device": self.tokens_per_device,
            "node_size": self.node_size,
            "rounds": [
                [[group.ranks[0], group.degree, list(group.samples)] for group in round_.groups]
                for round_ in self.rounds
            ],
        }
        if self.vision_patches is not None:
            canonical["vision_patches"] = list(self.vision_patches)
        if self.vision_patches_per_device is not None:
            canonical["vision_patches_per_device"] = self.vision_patches_per_device
        encoded = json.dumps(canonical, separators=(",", ":"), sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()

    def stats(self) -> dict[str, float]:
        """Flat numbers for a logger (times in seconds, counts as floats)."""
        groups = [group for round_ in self.rounds for group in round_.groups]
        degrees = [group.degree for group in groups]
        padded_tokens = sum(group.tokens_per_rank * group.degree for group in groups)
        tokens = sum(self.lengths)
        return {
            "num_samples": float(len(self.lengths)),
            "num_rounds": float(len(self.rounds)),
            "num_groups": float(len(groups)),
            "max_degree": float(max(degrees)),
            "mean_degree": sum(degrees) / len(degrees),
            "idle_device_rounds": float(self.num_devices * len(self.rounds) - sum(degrees)),
            "predicted_time": self.predicted_time,
            "lower_bound": self.lower_bound,
            "gap_to_lower_bound": self.predicted_time / self.lower_bound - 1.0 if self.lower_bound > 0 else 0.0,
            "tokens": float(tokens),
            "padding_tokens": float(padded_tokens - tokens),
            "max_tokens_per_rank": float(max(group.tokens_per_rank for group in groups)),
            "memory_utilization": padded_tokens / (self.num_devices * len(self.rounds) * self.tokens_per_device),
        }

    def summary(self) -> str:
        """Readable multi-line description: totals, then one line per group."""
        gap = self.predicted_time / self.lower_bound - 1.0 if self.lower_bound > 0 else 0.0
        node = f", nodes of {self.node_size}" if self.node_size else ""
        patches = f", {sum(self.vision_patches)} vision patches" if self.vision_patches else ""
        budget = self.vision_patches_per_device
        vision_budget_shown = f" and {budget} vision patches" if budget is not None else ""
        lines = [
            f"Plan: {len(self.lengths)} samples ({sum(self.lengths)} tokens{patches}) on {self.num_devices} devices "
            f"x {self.tokens_per_device} tokens{vision_budget_shown}{node}, {len(self.rounds)} round(s), predicted "
            f"{self.predicted_time:.4g} s (lower bound {self.lower_bound:.4g} s, +{100 * gap:.1f}%)"
        ]
        for round_index, round_ in enumerate(self.rounds):
            busy = sum(group.degree for group in round_.groups)
            lines.append(
                f"  round {round_index}: {round_.predicted_time:.4g} s, {len(round_.groups)} groups, "
                f"{busy}/{self.num_devices} devices busy"
            )
            for group in round_.groups:
                shown = ", ".join(str(sample) for sample in group.samples[:8])
                more = f", ... +{len(group.samples) - 8}" if len(group.samples) > 8 else ""
                lines.append(
                    f"    ranks {group.ranks[0]}-{group.ranks[-1]} (d={group.degree}): "
                    f"{group.predicted_time:.4g} s, {group.tokens_per_rank} tokens/rank, "
                    f"samples [{shown}{more}]"
                )
        return "\n".join(lines)


def _check_ranks(group: Group, num_devices: int, where: str) -> None:
    if not group.ranks:
        raise PlanError(f"{where} has no ranks")
    expected = tuple(range(group.ranks[0], group.ranks[0] + len(group.ranks)))
    if group.ranks != expected:
        raise PlanError(f"{where} is not a contiguous rank range")
    if group.ranks[0] < 0 or group.ranks[-1] >= num_devices:
        raise PlanError(f"{where} lies outside range(num_devices={num_devices})")
