"""Which waiting jobs may start now. Pure: every number, and the time, comes in as an argument.

The rule (like ollama's scheduler, one explicit fit decision per job): a job starts when its
steady footprint fits in what the budget leaves after running jobs and outstanding leases, and in
what the device itself still has free (memory outside edgezo counts too). Candidates are taken
first-come; a later, smaller job may start ahead of one that does not fit, until the one in front
has waited `max_wait_s` — from then on nobody overtakes it (bounded wait, no starvation).
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import fmt_bytes


@dataclass(frozen=True)
class Candidate:
    job_id: str
    need_bytes: int
    queued_at: float  # when it became eligible (enqueue, window opening, pause)
    resume: bool = False  # a job that ran before goes ahead of new ones


@dataclass(frozen=True)
class Decision:
    job_id: str
    start: bool
    reason: str  # why it waits ("" when it starts)


def headroom(budget: int, committed: int, device_free: int | None, reserve: int = 0) -> int:
    """Bytes a new job or lease may take: under the budget and under what the device has free."""
    room = budget - committed
    if device_free is not None:
        room = min(room, device_free - reserve)
    return room


def order(candidates: list[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=lambda c: (not c.resume, c.queued_at, c.job_id))


def admit(
    candidates: list[Candidate],
    *,
    budget: int,
    committed: int,
    device_free: int | None,
    now: float,
    reserve: int = 0,
    max_wait_s: float = 600.0,
    max_jobs: int | None = None,
    running: int = 0,
) -> list[Decision]:
    """One decision per candidate, in the order they were considered."""
    decisions: list[Decision] = []
    blocked_by: str | None = None
    for c in order(candidates):
        room = headroom(budget, committed, device_free, reserve)
        if blocked_by is not None:
            decisions.append(Decision(c.job_id, False, f"waiting: behind {blocked_by} (first come, waited too long)"))
            continue
        if max_jobs is not None and running >= max_jobs:
            decisions.append(Decision(c.job_id, False, f"waiting: {running} jobs running (max {max_jobs})"))
            continue
        if c.need_bytes <= room:
            decisions.append(Decision(c.job_id, True, ""))
            committed += c.need_bytes
            if device_free is not None:
                device_free -= c.need_bytes
            running += 1
            continue
        why = f"waiting: needs {fmt_bytes(c.need_bytes)}, {fmt_bytes(max(room, 0))} free under budget {fmt_bytes(budget)}"
        if device_free is not None and device_free - reserve < budget - committed:
            why += f" (device has {fmt_bytes(max(device_free, 0))} free)"
        decisions.append(Decision(c.job_id, False, why))
        if now - c.queued_at >= max_wait_s:
            blocked_by = c.job_id
    return decisions


def pressure_victim(running: list[tuple[str, float]], over_bytes: int) -> str | None:
    """When usage exceeds the budget: pause the job that started last (least work lost, oldest keeps going).

    `running` is (job_id, started_at) of jobs not already being paused.
    """
    if over_bytes <= 0 or not running:
        return None
    return max(running, key=lambda r: (r[1], r[0]))[0]


def over_own_budget(used: int, cap: int, for_s: float, job_id: str) -> str:
    """Why a job over its own `budget:` is stopped, and how to go on (the seed-log keeps its steps)."""
    return (f"used {fmt_bytes(used)}, over its own budget of {fmt_bytes(cap)} for {for_s:.0f} s; "
            f"`edgezo retry {job_id} --budget SIZE` resumes it from its seed-log with a larger budget")

