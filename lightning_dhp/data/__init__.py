"""Data helpers: real length distributions (numpy only; keep this import light)."""

from lightning_dhp.data.lengths import (
    DISTRIBUTIONS,
    LengthDistribution,
    LengthFileError,
    read_metadata,
    sample_token_lengths,
    shared_data_dir,
    token_lengths,
)

__all__ = [
    "DISTRIBUTIONS",
    "LengthDistribution",
    "LengthFileError",
    "read_metadata",
    "sample_token_lengths",
    "shared_data_dir",
    "token_lengths",
]
