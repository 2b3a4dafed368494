"""Process-group pool and the current context-parallel context."""

from lightning_dhp.distributed.context import CPContext, cp_context, current_cp_context, require_cp_context

__all__ = ["CPContext", "cp_context", "current_cp_context", "require_cp_context"]
