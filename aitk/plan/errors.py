"""The one error type of the plan: a message that names the problem and the fix, shown as is."""

from __future__ import annotations


class PlanInputError(ValueError):
    """A job, model folder or config the plan cannot use; str() is the whole user-facing story."""
