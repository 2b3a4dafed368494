"""The bins (context-parallel groups) of samples that refinement and rebalancing change, and their memory.

Refinement (:mod:`.refine`) moves, swaps, merges and splits the bins of one round; rebalancing
(:mod:`.rebalance`) moves and swaps samples between the groups of different rounds. Both keep the
same facts about their bins here. Their times stay with them, because they differ: refinement adds
up per-sample costs of bins not yet placed on ranks, whose degrees change; rebalancing times groups
placed on ranks (:meth:`~.cost_model.CostModel.placed_times`), of fixed degrees, from their sums.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lightning_dhp.planner.memory import fits_memory

# (samples, degrees) -> each sample's cost at its degree (None: costs not kept), and its padded length there
Lookup = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray | None, np.ndarray]]


class Bins:
    """Each bin's members, degree, padded tokens and vision patches, each sample's bin and padded length (and
    cost, where kept) in it, and the memory every change keeps to: a bin of degree ``d`` holds
    ``d x tokens_per_device`` padded tokens and, under a vision budget, ``d x patch_budget`` vision patches."""

    def __init__(
        self,
        members: list[list[int]],
        degree: np.ndarray,
        lookup: Lookup,
        tokens_per_device: int,
        patches: np.ndarray | None = None,
        patch_budget: int | None = None,
    ) -> None:
        """``members``: every sample in exactly one bin; ``lookup(samples, degrees)``: the cost of ``samples[i]``
        at ``degrees[i]`` (refinement adds up per-sample costs; None where the caller keeps none) and its padded
        length there, in the dtype the token sums keep; ``patches``: each sample's vision
        patches in the dtype their sums keep (None: not kept); ``patch_budget``: the vision patches per rank
        (None: not checked)."""
        self.members = [list(bin_members) for bin_members in members]
        self.degree = np.asarray(degree, dtype=np.int64).copy()
        self.tokens_per_device, self.patch_budget = tokens_per_device, patch_budget
        self._lookup = lookup
        self.owner = np.empty(sum(map(len, self.members)), dtype=np.int64)
        for bin_index, bin_members in enumerate(self.members):
            self.owner[bin_members] = bin_index
        self.own_cost, self.own_padded = lookup(np.arange(len(self.owner)), self.degree[self.owner])
        self.tokens = np.bincount(self.owner, weights=self.own_padded, minlength=len(self.members)).astype(
            self.own_padded.dtype)
        self.patches = patches
        self.held = None if patches is None else np.bincount(
            self.owner, weights=patches, minlength=len(self.members)).astype(patches.dtype)

    def fits(self, degrees: np.ndarray | int, tokens: np.ndarray, held: np.ndarray | None) -> np.ndarray:
        """Whether bins of ``degrees`` hold ``tokens`` padded tokens and ``held`` vision patches (broadcasting;
        the patches are checked under a vision budget only)."""
        patch_capacity = None if held is None or self.patch_budget is None else degrees * self.patch_budget
        return fits_memory(tokens, degrees * self.tokens_per_device, held, patch_capacity)

    def move(self, sample: int, target: int) -> int:
        """Move ``sample`` to bin ``target``; returns the bin it left."""
        source = int(self.owner[sample])
        self.members[source].remove(sample)
        self.members[target].append(sample)
        self.owner[sample] = target
        self.tokens[source] -= self.own_padded[sample]
        cost, padded = self._lookup(np.array([sample]), self.degree[target])
        self.own_padded[sample] = padded[0]
        if self.own_cost is not None:
            self.own_cost[sample] = cost[0]
        self.tokens[target] += self.own_padded[sample]
        if self.held is not None:
            self.held[source] -= self.patches[sample]
            self.held[target] += self.patches[sample]
        return source

    def merge(self, into: int, other: int) -> None:
        """Bin ``other``'s samples join bin ``into``, whose degree becomes both degrees' sum; ``other`` is left
        empty, of degree 0."""
        self.owner[self.members[other]] = into
        self.members[into].extend(self.members[other])
        self.members[other] = []
        self.degree[into] += self.degree[other]
        self.degree[other] = 0
        self.tokens[other] = 0
        if self.held is not None:
            self.held[into] += self.held[other]
            self.held[other] = 0
        self._repad(into)

    def split(self, bin_index: int, kept: list[int], leaving: list[int], kept_degree: int, leaving_degree: int) -> int:
        """Bin ``bin_index`` keeps ``kept`` at ``kept_degree``; ``leaving`` (its other samples) go to a new bin
        of ``leaving_degree``, whose index this returns."""
        new_bin = len(self.members)
        self.members[bin_index] = kept
        self.members.append(leaving)
        self.owner[leaving] = new_bin
        self.degree = np.append(self.degree, leaving_degree)
        self.degree[bin_index] = kept_degree
        self.tokens = np.append(self.tokens, 0)
        if self.held is not None:
            self.held = np.append(self.held, self.patches[leaving].sum())
            self.held[bin_index] = self.patches[kept].sum()
        for changed in (bin_index, new_bin):
            self._repad(changed)
        return new_bin

    def _repad(self, bin_index: int) -> None:
        """Its members' padded lengths (and costs) at the bin's degree, and their sum."""
        bin_members = self.members[bin_index]
        if not bin_members:
            self.tokens[bin_index] = 0
            return
        cost, padded = self._lookup(np.array(bin_members), self.degree[bin_index])
        self.own_padded[bin_members] = padded
        if self.own_cost is not None:
            self.own_cost[bin_members] = cost
        self.tokens[bin_index] = padded.sum()
