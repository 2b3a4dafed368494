"""Silence the one known warning that floods the jobs' logs, and nothing else."""

from __future__ import annotations

import re
import warnings

# torch >= 2.13 deprecates LeafSpec, which Lightning 2.6 still builds in every step's result handling
# (lightning/pytorch/utilities/_pytree.py), so each rank prints this once per logged step.
LIGHTNING_PYTREE_WARNING = ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) "
                            "and treespec.is_leaf()` instead.")


def ignore_lightning_pytree_warning() -> None:
    """Ignore :data:`LIGHTNING_PYTREE_WARNING` (exact message, ``FutureWarning`` only) in this process."""
    warnings.filterwarnings("ignore", message=re.escape(LIGHTNING_PYTREE_WARNING) + r"\Z", category=FutureWarning)
