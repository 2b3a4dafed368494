"""Context-parallel attention for packed variable-length batches (knows nothing of Lightning)."""

from lightning_dhp.attention.layout import ZigzagLayout

__all__ = ["ZigzagLayout"]
