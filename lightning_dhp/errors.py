"""The errors lightning-dhp raises on purpose, in one hierarchy.

Catch :class:`DHPError` for any of them. Errors about bad input (configuration, data, planner
arguments) are also ``ValueError``; errors about ranks that disagree at run time are also
``RuntimeError``. Every message says what was wrong and what to change. Pure Python, so the planner
can use it without importing torch.
"""

from __future__ import annotations


class DHPError(Exception):
    """Base of every error lightning-dhp raises on purpose."""


class DHPConfigError(DHPError, ValueError):
    """DHPStrategy (or a DHP helper) used in a way it cannot work; the message says what to change."""


class DHPDataError(DHPError, ValueError):
    """A dataset item or length that cannot be trained; the message names the dataset index and the fix."""


class PlanError(DHPError, ValueError):
    """Bad planner input or a broken plan; the message names the item, the limit and the fix."""


class DHPRankMismatchError(DHPError, RuntimeError):
    """Ranks disagree about a step: its plan, what their steps returned, or what they logged."""


class DHPLoaderError(DHPError, RuntimeError):
    """A rank's DataLoader worker stalled past ``data_wait_timeout`` or died; raised on every rank, naming
    the rank, the worker, its state and its Python stack."""
