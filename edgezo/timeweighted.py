"""Peak and time-weighted average memory: the one rule, used by the worker's meter, the daemon's
running figures in `edgezo status`, the daemon's report and the synthetic engine.

The rule is the trapezoid: memory is taken to move linearly between two readings. An interval
between two readings belongs to the phase in effect at its start, so in a list of labelled samples
the interval up to the first sample of the next phase still counts for the phase that was running.
The last reading closes the record (nothing is extrapolated past it). Stdlib only: the daemon uses
it without torch.
"""

from __future__ import annotations

from typing import Any


class Accumulator:
    """Peak and trapezoid time-weighted average of a sampled quantity.

    Feed ``(t, value)`` pairs in time order. ``pause()`` ends a segment: the next value starts a new
    one and the gap is not integrated (a phase that was left and re-entered). ``peak`` may exceed
    ``value`` when the source knows a higher value since the last sample. ``carry_to`` integrates up
    to a reading that belongs to someone else (the next phase's first sample) without counting it.
    """

    def __init__(self) -> None:
        self.samples = 0
        self.peak = 0
        self.min: int | None = None
        self.integral = 0.0  # byte-seconds
        self.duration = 0.0  # seconds covered by segments
        self._sum = 0
        self._last: tuple[float, int] | None = None

    def add(self, t: float, value: int, peak: int | None = None) -> None:
        self.carry_to(t, value)
        self._last = (t, value)
        self.samples += 1
        self._sum += value
        self.peak = max(self.peak, value, value if peak is None else peak)
        self.min = value if self.min is None else min(self.min, value)

    def carry_to(self, t: float, value: int) -> None:
        if self._last is not None:
            t0, v0 = self._last
            dt = t - t0
            if dt > 0:
                self.integral += (v0 + value) / 2 * dt
                self.duration += dt

    def pause(self) -> None:
        self._last = None

    @property
    def avg(self) -> float:
        """Time-weighted mean; the plain mean while no time has passed yet (one sample)."""
        if self.duration > 0:
            return self.integral / self.duration
        return self._sum / self.samples if self.samples else 0.0

    def as_dict(self) -> dict[str, int]:
        return {"peak_bytes": int(self.peak), "avg_bytes": int(round(self.avg))}


def summarize(samples: list[tuple[float, int, str]]) -> dict[str, Any]:
    """Peak and time-weighted average, overall and per phase, from (ts, bytes, phase) samples."""
    if not samples:
        return {"peak_bytes": 0, "avg_bytes": 0, "duration_s": 0.0, "samples": 0, "phases": {}}
    overall = Accumulator()
    phases: dict[str, Accumulator] = {}
    previous: str | None = None
    for t, nbytes, phase in samples:
        phase = phase or "unknown"
        overall.add(t, nbytes)
        if previous is not None and previous != phase:
            phases[previous].carry_to(t, nbytes)  # the interval up to here was still `previous`'s
            phases[previous].pause()
        phases.setdefault(phase, Accumulator()).add(t, nbytes)
        previous = phase
    return {
        **overall.as_dict(),
        "duration_s": round(overall.duration, 3),
        "samples": len(samples),
        "phases": {name: {**acc.as_dict(), "duration_s": round(acc.duration, 3), "samples": acc.samples}
                   for name, acc in phases.items()},
    }
