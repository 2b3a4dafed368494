"""Context-parallel attention for packed variable-length batches (knows nothing of Lightning)."""

from lightning_dhp.attention.api import cp_attention
from lightning_dhp.attention.kernels import select_kernel
from lightning_dhp.attention.layout import ZigzagLayout

__all__ = ["ZigzagLayout", "cp_attention", "select_kernel"]
