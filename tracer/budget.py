"""The policy: how many device bytes chunks may use at a moment.

``chunk budget(t) = device_budget - margin - non_model(t)`` where non_model(t) is the larger
of the peak the warm-up recorded for moment t's interval (less what the activation plan keeps
in host memory then) and what is live right now.
"""
from __future__ import annotations

from .store import MomentRecord


class BudgetPolicy:
    def __init__(self, device_budget: int, margin: int):
        self.device_budget = device_budget  # the promise: chunks + non-model never above it
        self.margin = margin                # kept free for allocator slack

    @property
    def usable(self) -> int:
        return self.device_budget - self.margin

    def chunk_budget(self, record: MomentRecord | None, current_non_model: int) -> int:
        recorded = record.device_non_model if record is not None else 0
        return self.usable - max(recorded, current_non_model)

    def prefetch_budget(self, now: MomentRecord | None, upcoming: MomentRecord | None,
                        current_non_model: int) -> int:
        """Bytes chunks may use while the next moment's chunks arrive during this interval."""
        peaks = [r.device_non_model for r in (now, upcoming) if r is not None]
        return self.usable - max([current_non_model, *peaks])
