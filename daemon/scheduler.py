"""The scheduler: every decision the daemon takes about memory, in one place and one fixed order.

Shaped like ollama's `server/sched.go`: `Daemon.tick` samples the device, then `decide` runs

    expire leases -> enforce windows -> relieve pressure -> enforce job budgets -> admit -> grant leases
    -> unblock leases

from that one snapshot. The decisions themselves are pure functions in `policies/` (admission,
leases); this class gathers their inputs from the daemon's jobs, device sample and lease broker and
carries out their answers through the daemon's job actions (`start`, `pause`, `fail`, `event`,
`save`, `wait_for_disk`). It owns only the clocks of its grace periods.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from edgezo.protocol import Control, JobState, Phase
from policies import admission
from policies import leases as lease_policy
from policies import memory as mem

from . import windows
from .diskroom import free_disk
from .store import Job

if TYPE_CHECKING:
    from .core import Daemon

log = logging.getLogger("edgezo.daemon")


class Scheduler:
    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.over_since: float | None = None  # since when the device is over budget (pressure grace)
        self.blocked_since: float | None = None  # since when the leases are stuck (see unblock_leases)
        self.over_own_since: dict[str, float] = {}  # job -> since when it is over its own budget

    def decide(self, now: float) -> None:
        """One round of decisions on the daemon's latest device sample."""
        d = self.d
        for lease in d.leases.expire(now, self.heartbeat_of):
            log.warning("lease %s of %s expired (worker stopped heartbeating)", lease.phase, lease.job_id)
            job = d.jobs.get(lease.job_id)
            if job:
                d.event(job, "lease-expired", {"phase": lease.phase, "bytes": lease.nbytes})
        if d.stopping:
            return
        self.enforce_windows(now)
        self.relieve_pressure(now)
        self.enforce_job_budgets(now)
        self.admit(now)
        self.grant(now)
        self.unblock_leases(now)

    def steady(self, job: Job) -> int:
        """What admission reserves for a job: a declared `budget` is an allotment the job may grow
        into (kept even when it measures less); a model-based estimate yields to measurement."""
        if job.spec.get("budget"):
            return max(int(job.spec["budget"]), job.measured or 0)
        return mem.refine(job.estimate, job.measured)

    def pending(self) -> int:
        """Memory promised but not yet visible in measurements: starting workers and fresh leases.

        A running job is counted at its steady (ZO-step) footprint, since it may climb back there,
        unless it is idle: every step done and waiting for a lease (its last projection or the final
        eval). It sleeps until granted, so it holds what it holds now, and the lease covers the rest.
        Counting idle jobs at their step peaks made jobs queued at the end look like a deadlock."""
        d = self.d
        unmeasured = sum(max(self.steady(j) - d.usage(j.id), 0) for j in d.running() if not self.idle(j))
        return unmeasured + d.leases.outstanding(d.usage)

    def idle(self, job: Job) -> bool:
        d = self.d
        return (bool(job.steps_total) and job.step >= job.steps_total and d.usage(job.id) > 0
                and any(x.granted is None for x in d.leases.of_job(job.id)))

    def headroom(self) -> int:
        d = self.d
        dev = d.device
        assert dev is not None
        pend = self.pending()
        return admission.headroom(d.budget, dev.usage + pend, dev.free - pend, d.cfg.reserve)

    def unblock_leases(self, now: float) -> None:
        """Break a lease deadlock that has lasted `lease_max_wait_s` (policies.leases.unblock decides)."""
        d = self.d
        running, pending = d.running(), d.leases.waiting()
        if not pending or not d.cfg.leases or any(j.control != Control.RUN for j in running):
            self.blocked_since = None  # nothing waits, or someone is already pausing or stopping
            return
        waiting = [lease_policy.Request(x.key, x.job_id, x.phase, x.nbytes, x.requested) for x in pending]
        holders = [lease_policy.Holder(j.id, j.started or 0.0, d.usage(j.id)) for j in running]
        decision = lease_policy.unblock(holders, waiting, granted=len(d.leases.granted()),
                                        headroom=self.headroom(), budget=d.budget, fmt=mem.fmt_bytes)
        if decision is None:
            self.blocked_since = None
            return
        if self.blocked_since is None:
            self.blocked_since = now
        if now - self.blocked_since < d.cfg.lease_max_wait_s:
            return
        job = d.jobs[decision.job_id]
        log.warning("job %s: %s (%s)", job.id, decision.action, decision.reason)
        if decision.action == "pause":
            d.pause(job, decision.reason)
        else:
            d.fail(job, decision.reason)
        self.blocked_since = None

    def heartbeat_of(self, job_id: str) -> float | None:
        d = self.d
        job = d.jobs.get(job_id)
        if job is None or job.state != JobState.RUNNING:
            return None
        return job.heartbeat

    def enforce_windows(self, now: float) -> None:
        d = self.d
        dt = datetime.fromtimestamp(now, timezone.utc)
        for job in d.running():
            if job.window and job.control == Control.RUN and not windows.in_window(job.window, dt):
                d.pause(job, f"outside its window '{job.window}'")

    def relieve_pressure(self, now: float) -> None:
        d = self.d
        dev = d.device
        assert dev is not None
        over = max(dev.usage - d.budget, d.cfg.reserve - dev.free if dev.free < d.cfg.reserve else 0)
        if over <= 0:
            self.over_since = None
            return
        if self.over_since is None:
            self.over_since = now
        if now - self.over_since < d.cfg.pressure_grace_s:
            return
        if any(j.control == Control.PAUSE for j in d.running()):
            return  # one at a time: wait for that one to checkpoint and free its memory
        victims = [(j.id, j.started or 0.0) for j in d.running() if j.control == Control.RUN]
        victim = admission.pressure_victim(victims, over)
        if victim:
            d.pause(d.jobs[victim], f"memory pressure: {mem.fmt_bytes(dev.usage)} used, "
                                           f"budget {mem.fmt_bytes(d.budget)}, {mem.fmt_bytes(dev.free)} free")
            self.over_since = now

    def enforce_job_budgets(self, now: float) -> None:
        """A job's own `budget:` caps its steady footprint (ZO steps; loading is transient and leased
        heavy phases are the device budget's business). Over it for `--pressure-grace` seconds, the
        job fails (pausing would only readmit it into the same overrun), saying how to resume it."""
        d = self.d
        for job in d.running():
            cap = job.spec.get("budget")
            used = d.usage(job.id)
            leased = any(x.granted is not None for x in d.leases.of_job(job.id))
            steady = job.phase == Phase.ZO_STEP and not leased  # not loading, evaluating or projecting
            if not cap or job.control != Control.RUN or not steady or used <= int(cap):
                self.over_own_since.pop(job.id, None)
                continue
            since = self.over_own_since.setdefault(job.id, now)
            if now - since >= d.cfg.pressure_grace_s:
                d.fail(job, admission.over_own_budget(used, int(cap), now - since, job.id))

    def admit(self, now: float) -> None:
        d = self.d
        dt = datetime.fromtimestamp(now, timezone.utc)
        candidates = []
        for job in d.jobs.values():
            if job.state not in (JobState.QUEUED, JobState.PAUSED):
                continue
            if job.not_before and now < job.not_before:
                job.reason = f"waiting: starts at {datetime.fromtimestamp(job.not_before).isoformat(timespec='minutes')}"
                continue
            if job.window and not windows.in_window(job.window, dt):
                opening, _ = windows.window_edges(job.window, dt)
                when = f" (opens {opening.isoformat(timespec='minutes')})" if opening else ""
                job.reason = f"waiting: outside its window '{job.window}'{when}"
                continue
            if d.wait_for_disk(job):  # before memory: a job that cannot start takes no one's room
                continue
            candidates.append(admission.Candidate(job.id, self.steady(job), job.queued_at, job.state == JobState.PAUSED))
        if not candidates:
            return
        free = free_disk(d.jobs_dir)
        if free < d.cfg.disk_reserve:  # a worker would fail on its first seed-log write
            reason = (f"waiting for disk space: {mem.fmt_bytes(free)} free under {d.jobs_dir}, a job starts with "
                      f"at least {mem.fmt_bytes(d.cfg.disk_reserve)} free")
            for c in candidates:
                job = d.jobs[c.job_id]
                if job.reason != reason:
                    job.reason = reason
                    d.save(job)
            return
        dev = d.device
        assert dev is not None
        pend = self.pending() + sum(x.nbytes for x in d.leases.waiting())  # running jobs' heavy phases first
        decisions = admission.admit(
            candidates,
            budget=d.budget,
            committed=dev.usage + pend,
            device_free=dev.free - pend,
            now=now,
            reserve=d.cfg.reserve,
            max_wait_s=d.cfg.admit_max_wait_s,
            max_jobs=d.cfg.max_jobs,
            running=len(d.running()),
        )
        for decision in decisions:
            job = d.jobs[decision.job_id]
            if decision.start and not d.wait_for_disk(job):  # again: the jobs started just now write too
                d.start(job, now)
            elif job.reason != decision.reason:
                job.reason = decision.reason
                d.save(job)

    def grant(self, now: float) -> None:
        d = self.d
        if d.device is None:
            return
        for lease in d.leases.grant(self.headroom(), now, d.usage):
            job = d.jobs.get(lease.job_id)
            if job:
                d.event(job, "lease-granted", {"phase": lease.phase, "bytes": lease.nbytes,
                                                   "waited_s": round(now - lease.requested, 3)})
