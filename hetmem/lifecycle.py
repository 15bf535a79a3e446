"""The engine's lifecycle: one state for where a training step is, instead of flags spread
over the engine, the scheduler and the tracer (STYLE.md 15, like FSDP2's ``TrainingState``).

The engine changes it only through ``Lifecycle.go`` (legal transitions are written down in
``TRANSITIONS`` and an illegal one raises) and checks where a call may start with
``Lifecycle.assert_in``.  The scheduler reads it (``traced``, ``phase``); the tracer keeps its
own mode (warm-up, steady, stale: tracer/tracer.py), which is about the schedule, not the step.
"""
from __future__ import annotations

import contextlib
import enum

from hetmem.chunk_manager.states import IllegalTransition


class Phase(enum.Enum):
    IDLE = "idle"
    """Between micro-steps: a forward may start, or the optimizer step."""
    FORWARD = "forward"
    """A recorded forward ran (or runs): the micro-step is open until ``backward``."""
    BACKWARD = "backward"
    """``engine.backward(loss)`` is running."""
    OPTIMIZER = "optimizer"
    """``engine.step()`` is running."""
    UNTRACED = "untraced"
    """A forward without gradients (``torch.no_grad``): not recorded, nothing to backpropagate."""
    CLOSED = "closed"
    """``engine.close()`` ran: every call raises."""


# where each phase may go; IDLE is reachable from every open phase (an aborted step goes there)
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.FORWARD, Phase.OPTIMIZER, Phase.UNTRACED, Phase.IDLE, Phase.CLOSED}),
    Phase.FORWARD: frozenset({Phase.BACKWARD, Phase.UNTRACED, Phase.IDLE, Phase.CLOSED}),
    Phase.BACKWARD: frozenset({Phase.IDLE, Phase.CLOSED}),
    Phase.OPTIMIZER: frozenset({Phase.IDLE, Phase.CLOSED}),
    Phase.UNTRACED: frozenset({Phase.IDLE, Phase.FORWARD, Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.state = Phase.IDLE             # changed only by go()

    def go(self, new: Phase) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"engine lifecycle: {self.state.name} -> {new.name} is not allowed "
                                    f"(from {self.state.name}: {', '.join(sorted(p.name for p in TRANSITIONS[self.state]))})")
        self.state = new

    def assert_in(self, *states: Phase, doing: str, fix: str) -> None:
        """Raise RuntimeError naming the call, the state and the fix unless in one of ``states``."""
        if self.state not in states:
            raise RuntimeError(f"{doing} while the engine is {self.state.value}; {fix}")

    @contextlib.contextmanager
    def untraced(self):
        """A forward without gradients, inside or between micro-steps; then back where it was
        (unless an abort moved it meanwhile)."""
        previous = self.state
        self.go(Phase.UNTRACED)
        try:
            yield
        finally:
            if self.state is Phase.UNTRACED:
                self.go(previous)

    @property
    def traced(self) -> bool:
        """Inside a recorded micro-step (its forward or backward)."""
        return self.state in (Phase.FORWARD, Phase.BACKWARD)
