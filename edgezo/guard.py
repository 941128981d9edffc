"""The divergence guard: when the training loss climbs clearly above its best, go back and slow down.

ZO at a too-large lr looks fine for a while and then falls apart (ANCHORS: norms at lr 1e-3 held
45 steps, then went from 78 % to 51 %). The guard keeps an exponential moving average of each step's
loss. Once the average rises `rise` (relative) above the best average seen, the weights return to
the step where that best was reached — rebuilt from the seed-log, no snapshot needed — and lr is
multiplied by `lr_factor`. A ROLLBACK frame in the seed-log records it, so replay and resume follow
the same path; the guard's own state is a pure function of the logged losses, so a resumed job
takes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Rollback:
    at: int  # the step whose loss triggered it
    to: int  # the weights return to the state after this step (-1: the base weights)
    lr_scale: float  # lr multiplier from now on (cumulative)


class DivergenceGuard:
    def __init__(self, *, rise: float, span: int, lr_factor: float):
        self.rise, self.span, self.lr_factor = rise, span, lr_factor
        self.alpha = 2.0 / (span + 1)
        self.ema: float | None = None
        self.seen = 0  # steps averaged since the start or the last rollback
        self.best: float | None = None
        self.best_step = -1
        self.lr_scale = 1.0
        self.rollbacks = 0
        self.pending: Rollback | None = None  # tripped on the last step, not rolled back yet (resume)

    @property
    def enabled(self) -> bool:
        return self.rise > 0

    def observe(self, step: int, loss: float) -> Rollback | None:
        """Feed the loss of `step` (after its update is applied); a Rollback when the guard trips."""
        self.pending = self._observe(step, loss)
        return self.pending

    def _observe(self, step: int, loss: float) -> Rollback | None:
        if not self.enabled:
            return None
        if not math.isfinite(loss):
            return self._trip(step) if self.best is not None else None
        self.ema = loss if self.ema is None else self.ema + self.alpha * (loss - self.ema)
        self.seen += 1
        if self.seen < max(1, self.span // 2):  # too few losses for the average to mean anything
            return None
        if self.best is None or self.ema < self.best:
            self.best, self.best_step = self.ema, step
            return None
        if self.ema > self.best + self.rise * abs(self.best):
            return self._trip(step)
        return None

    def _trip(self, step: int) -> Rollback:
        return Rollback(at=step, to=self.best_step, lr_scale=self.lr_scale * self.lr_factor)

    def rolled_back(self, rb: Rollback) -> None:
        """The weights are back at `rb.to`: average from the best again, at the lower lr."""
        self.pending = None
        self.ema = self.best
        self.seen = max(self.seen, self.span)
        self.lr_scale = rb.lr_scale
        self.rollbacks += 1

    def frame(self, rb: Rollback) -> dict:
        return {"step": rb.at, "to": rb.to, "lr_scale": rb.lr_scale, "best_loss": self.best}
