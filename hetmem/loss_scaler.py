"""Loss scaling for fp16: dynamic (halve on overflow, double after a run of good steps) or fixed."""
from __future__ import annotations

import logging

logger = logging.getLogger("hetmem.loss_scaler")


class LossScaler:
    """Like torch.amp.GradScaler's policy; ``scale`` is 1 when scaling is off (fp32, bf16)."""

    def __init__(self, mode: float | str | None, *, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        self.dynamic = mode == "dynamic"
        self.scale = init_scale if self.dynamic else float(mode or 1.0)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0          # steps without overflow since the last change
        self.skipped_steps = 0       # steps skipped because of overflow, in total

    def update(self, overflow: bool) -> None:
        if overflow:
            self.skipped_steps += 1
            if self.dynamic:
                self.scale = max(self.min_scale, self.scale * self.backoff_factor)
                logger.info("fp16 overflow: step skipped, loss scale lowered to %g", self.scale)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.dynamic and self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
