"""Each job's memory as the daemon measures it: peak and time-weighted average, kept as samples arrive.

`edgezo status` shows these for running jobs on every call, so they are kept incrementally (one
`Accumulator` per job) instead of rescanning the stored samples; after a daemon restart a job's
accumulator is rebuilt from its stored history once. The report's figures come from the same rule
over the same samples (`store.memory_summary`), so the two always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from edgezo.timeweighted import Accumulator

from .store import memory_summary

Samples = Callable[[str], Iterable[tuple[float, int, str]]]  # job -> its stored (ts, bytes, phase) samples


class MemoryAccounts:
    def __init__(self, samples: Samples):
        self._samples = samples
        self._acc: dict[str, Accumulator] = {}

    def _of(self, job_id: str) -> Accumulator:
        acc = self._acc.get(job_id)
        if acc is None:  # first look since the daemon started: from the job's stored history
            acc = self._acc[job_id] = Accumulator()
            for ts, nbytes, _ in self._samples(job_id):
                acc.add(ts, nbytes)
        return acc

    def add(self, job_id: str, now: float, used: int) -> None:
        self._of(job_id).add(now, used)

    def running(self, job_id: str) -> tuple[int, int]:
        """(peak, time-weighted average) bytes so far."""
        acc = self._of(job_id)
        return int(acc.peak), int(round(acc.avg))

    def forget_all(self) -> None:
        """Drop the running figures (they are rebuilt from the store on the next look)."""
        self._acc.clear()

    def summary(self, job_id: str, meter: str) -> dict[str, Any]:
        """Every stored sample, by phase: the daemon's half of a job's report."""
        summary = memory_summary(list(self._samples(job_id)))
        summary["meter"] = meter
        return summary
