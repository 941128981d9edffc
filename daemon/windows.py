"""Cron time windows (APScheduler 3.x triggers) and the timers that wake the scheduler.

A window is a 5-field cron expression read at minute granularity: the job may run during every
minute the expression matches, so `* 1-5 * * *` is 01:00-05:59. A single number in the minute
field (the DESIGN example `0 1-5 * * *`) is read as the whole hour - a one-minute window is never
what is meant. `--at CRON` is different: the job becomes eligible at the next time the expression
fires, then runs to the end.

APScheduler only keeps time here (it wakes the scheduling loop when a window opens or closes);
the queue itself stays in SQLite.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger


def _trigger(expr: str) -> CronTrigger:
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected a 5-field cron expression, got {expr!r}")
    return CronTrigger.from_crontab(expr)


def window_trigger(expr: str) -> CronTrigger:
    fields = expr.split()
    if len(fields) == 5 and fields[0].isdigit():
        fields[0] = "*"
    return _trigger(" ".join(fields))


def validate(expr: str) -> None:
    _trigger(expr)


def in_window(expr: str, now: datetime) -> bool:
    trig = window_trigger(expr)
    minute = now.astimezone().replace(second=0, microsecond=0)
    nxt = trig.get_next_fire_time(None, minute)
    return nxt is not None and nxt <= minute


def next_fire(expr: str, now: datetime) -> datetime | None:
    return _trigger(expr).get_next_fire_time(None, now.astimezone())


def window_edges(expr: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """(next opening, next closing) of the window after `now`, for display and timers."""
    trig = window_trigger(expr)
    t = now.astimezone().replace(second=0, microsecond=0) + timedelta(minutes=1)
    is_open = in_window(expr, now)
    opening = None if is_open else trig.get_next_fire_time(None, t)
    closing = None
    if is_open:
        for _ in range(60 * 24 * 8):  # at most a week ahead, minute by minute
            if not in_window(expr, t):
                closing = t
                break
            t += timedelta(minutes=1)
    return opening, closing


class Timers:
    """Wakes the scheduler when a window may have opened/closed or an --at time arrives."""

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake
        self.sched = AsyncIOScheduler()
        self.jobs: dict[str, list] = {}

    def start(self) -> None:
        self.sched.start()

    def stop(self) -> None:
        try:
            self.sched.shutdown(wait=False)
        except Exception:
            pass

    def watch(self, job_id: str, *, window: str | None = None, at: datetime | None = None) -> None:
        self.forget(job_id)
        entries = []
        if window:
            # every matching minute, and the minute after (closing edge)
            entries.append(self.sched.add_job(self.wake, window_trigger(window), id=f"{job_id}-window"))
        if at is not None:
            entries.append(self.sched.add_job(self.wake, "date", run_date=at, id=f"{job_id}-at"))
        self.jobs[job_id] = entries

    def forget(self, job_id: str) -> None:
        for entry in self.jobs.pop(job_id, []):
            try:
                entry.remove()
            except Exception:
                pass
