"""How a training run talks to whoever supervises it.

The trainer calls these at step boundaries. `edgezo run` uses the defaults (no daemon: every
lease is granted, nothing pauses); the daemon's worker overrides them with socket calls.
Keeping this seam tiny is what lets the same trainer run in the foreground and under the daemon.
"""

from __future__ import annotations

from typing import Any

from edgezo.protocol import Control


class TrainerHooks:
    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """Progress and lifecycle: `kind` is an `edgezo.protocol.Event`."""

    def try_lease(self, phase: str, nbytes: int) -> bool:
        """Ask for `nbytes` of device memory for a heavy phase. False: not now, keep doing ZO steps."""
        return True

    def release_lease(self, phase: str) -> None:
        """The heavy phase is over and its memory is back."""

    def control(self) -> str:
        """What the supervisor asks now (`edgezo.protocol.Control`): run, pause (checkpoint and exit,
        resumable), stop (cancelled) or finish (no more steps: evaluate, export and report what there
        is, as if the last step were the final one)."""
        return Control.RUN

    def eval_wanted(self, step: int) -> bool:
        """An extra evaluation now, besides eval_every (benchmarks evaluate at wall-clock marks)."""
        return False
