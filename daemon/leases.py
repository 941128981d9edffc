"""The lease broker: memory reserved for a worker's heavy phase, so heavy phases don't coincide.

A worker asks (`request`) before each heavy phase and keeps asking at step boundaries until it is
granted; a grant reserves the bytes until the worker releases them, its heartbeat goes stale, or
it exits. Which waiting requests to grant is `policies.leases.choose`. A granted lease counts
only the part not yet visible in the worker's measured usage, so memory is never counted twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from policies import leases as policy


@dataclass
class Lease:
    id: int
    job_id: str
    phase: str
    nbytes: int
    requested: float
    last_asked: float
    granted: float | None = None
    base_usage: int = 0  # the job's measured usage when granted

    @property
    def key(self) -> str:
        return f"{self.job_id}/{self.phase}"

    def public(self, now: float) -> dict:
        return {
            "id": self.id,
            "job": self.job_id,
            "phase": self.phase,
            "bytes": self.nbytes,
            "state": "granted" if self.granted is not None else "waiting",
            "waited_s": round((self.granted or now) - self.requested, 3),
            "held_s": round(now - self.granted, 3) if self.granted is not None else None,
        }


class LeaseBroker:
    def __init__(self, *, policy_name: str = "fifo", max_wait_s: float = 30.0, ttl_s: float = 10.0, enabled: bool = True):
        if policy_name not in policy.POLICIES:
            raise ValueError(f"unknown lease policy {policy_name!r}")
        self.policy, self.max_wait_s, self.ttl_s, self.enabled = policy_name, max_wait_s, ttl_s, enabled
        self.leases: dict[str, Lease] = {}
        self._ids = itertools.count(1)
        self.last_request: dict[str, float] = {}  # job -> when its last new request came
        self.periods: dict[str, float] = {}  # job -> EMA of time between its heavy phases
        self.last_grant: dict[str, float] = {}
        self.granted_total = 0
        self.wait_s_total = 0.0

    def granted(self) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.granted is not None]

    def waiting(self) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.granted is None]

    def of_job(self, job_id: str) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.job_id == job_id]

    def request(self, job_id: str, phase: str, nbytes: int, now: float) -> Lease:
        key = f"{job_id}/{phase}"
        lease = self.leases.get(key)
        if lease is None:
            lease = Lease(next(self._ids), job_id, phase, int(nbytes), now, now)
            self.leases[key] = lease
            prev = self.last_request.get(job_id)
            if prev is not None and now > prev:
                gap = now - prev
                old = self.periods.get(job_id)
                self.periods[job_id] = gap if old is None else 0.5 * old + 0.5 * gap
            self.last_request[job_id] = now
        else:
            lease.last_asked = now
            if lease.granted is None:
                lease.nbytes = int(nbytes)
        return lease

    def release(self, job_id: str, phase: str) -> Lease | None:
        return self.leases.pop(f"{job_id}/{phase}", None)

    def drop_job(self, job_id: str) -> list[Lease]:
        gone = self.of_job(job_id)
        for lease in gone:
            del self.leases[lease.key]
        return gone

    def outstanding(self, usage_of: Callable[[str], int]) -> int:
        """Granted bytes not yet visible in the holders' measured usage."""
        return sum(max(lease.nbytes - max(usage_of(lease.job_id) - lease.base_usage, 0), 0) for lease in self.granted())

    def expire(self, now: float, heartbeat_of: Callable[[str], float | None]) -> list[Lease]:
        """Leases whose worker stopped heartbeating, and requests nobody asks for any more."""
        gone = []
        for lease in list(self.leases.values()):
            beat = heartbeat_of(lease.job_id)
            stale_worker = beat is None or now - beat > self.ttl_s
            stale_request = lease.granted is None and now - lease.last_asked > self.ttl_s
            if stale_worker or stale_request:
                gone.append(self.leases.pop(lease.key))
        return gone

    def grant(self, headroom: int, now: float, usage_of: Callable[[str], int]) -> list[Lease]:
        waiting = self.waiting()
        if not waiting:
            return []
        if not self.enabled:
            chosen = [lease.key for lease in waiting]
        else:
            reqs = [
                policy.Request(lease.key, lease.job_id, lease.phase, lease.nbytes, lease.requested,
                               self.periods.get(lease.job_id))
                for lease in waiting
            ]
            chosen = policy.choose(reqs, headroom=headroom, now=now, max_wait_s=self.max_wait_s,
                                   policy=self.policy, last_grant=self.last_grant,
                                   periods=self.periods)
        out = []
        for key in chosen:
            lease = self.leases[key]
            lease.granted = now
            lease.base_usage = usage_of(lease.job_id)
            self.last_grant[lease.job_id] = now
            self.granted_total += 1
            self.wait_s_total += now - lease.requested
            out.append(lease)
        return out
