"""Which waiting lease requests to grant. Pure: headroom, requests and the time are arguments.

Two policies:
- `fifo`: first-come with a bounded wait. Requests are granted oldest first while they fit; a
  later, smaller request may go ahead of one that does not fit, until the one in front has waited
  `max_wait_s` — then it blocks everything behind it until it fits (no starvation).
- `phase-offset`: jobs whose heavy phases recur with about the same period T form a group; within
  a group consecutive grants are spaced at least T/n apart, so n jobs settle into evenly spread
  phase offsets instead of colliding every period. It falls back to fifo for requests that have
  waited `max_wait_s`, and inside the same headroom rule.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("fifo", "phase-offset")


@dataclass(frozen=True)
class Request:
    key: str  # "<job>/<phase>"
    job_id: str
    phase: str
    nbytes: int
    since: float  # when it was first asked for
    period_s: float | None = None  # measured time between this job's heavy phases, if known


def groups(periods: dict[str, float], tolerance: float = 0.25) -> list[list[str]]:
    """Jobs whose periods are within `tolerance` (relative) of each other, sorted by period."""
    out: list[list[str]] = []
    for job, p in sorted(periods.items(), key=lambda kv: (kv[1], kv[0])):
        if out and abs(p - periods[out[-1][0]]) <= tolerance * periods[out[-1][0]]:
            out[-1].append(job)
        else:
            out.append([job])
    return out


def phase_offsets(periods: dict[str, float], tolerance: float = 0.25) -> dict[str, float]:
    """Target offset (seconds into the period) per job: jobs of one group spread evenly over T."""
    offsets: dict[str, float] = {}
    for group in groups(periods, tolerance):
        period = sum(periods[j] for j in group) / len(group)
        for i, job in enumerate(group):
            offsets[job] = i * period / len(group)
    return offsets


def min_spacing(job_id: str, periods: dict[str, float], tolerance: float = 0.25) -> tuple[float, list[str]]:
    """(T/n, other members) for the job's group; (0, []) when it has no peers."""
    for group in groups(periods, tolerance):
        if job_id in group and len(group) > 1:
            period = sum(periods[j] for j in group) / len(group)
            return period / len(group), [j for j in group if j != job_id]
    return 0.0, []


def choose(
    waiting: list[Request],
    *,
    headroom: int,
    now: float,
    max_wait_s: float = 30.0,
    policy: str = "fifo",
    last_grant: dict[str, float] | None = None,
    periods: dict[str, float] | None = None,
) -> list[str]:
    """Keys of the requests to grant now, in grant order.

    `periods` holds every known job's heavy-phase period (jobs not asking now still form groups);
    `last_grant` when each job last got a lease.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown lease policy {policy!r}; use one of {', '.join(POLICIES)}")
    last_grant = dict(last_grant or {})
    periods = dict(periods or {})
    periods.update({r.job_id: r.period_s for r in waiting if r.period_s})
    granted: list[str] = []
    for r in sorted(waiting, key=lambda r: (r.since, r.key)):
        overdue = now - r.since >= max_wait_s
        if policy == "phase-offset" and not overdue and r.period_s:
            spacing, peers = min_spacing(r.job_id, periods)
            recent = max((last_grant.get(p, float("-inf")) for p in peers), default=float("-inf"))
            if now - recent < spacing:
                continue  # too close to a peer's phase: keep doing ZO steps a little longer
        if r.nbytes <= headroom:
            granted.append(r.key)
            headroom -= r.nbytes
            last_grant[r.job_id] = now
        elif overdue:
            break  # it has waited long enough: nobody behind it may take the memory it needs
    return granted


@dataclass(frozen=True)
class Holder:
    """A running job, as the deadlock check sees it."""

    job_id: str
    started: float
    usage: int  # its measured memory now


@dataclass(frozen=True)
class Unblock:
    job_id: str
    action: str  # "pause" (frees its memory for the others; it is readmitted later) or "fail"
    reason: str


def unblock(running: list[Holder], waiting: list[Request], *, granted: int, headroom: int,
            budget: int, fmt=lambda n: f"{n} B") -> Unblock | None:
    """What to do when the leases are stuck for good, else None.

    Stuck means: every running job has a request waiting, none of them fits the headroom, and no
    lease is held (so nothing will be released). A worker keeps stepping while it waits, but it
    cannot finish without its heavy phase, so memory never comes down by itself. Then:
    - a job whose request cannot fit even if it ran alone under the budget fails, with the numbers;
    - otherwise the youngest running job pauses (it checkpoints, frees its memory, is readmitted
      once the others have their phases), as memory pressure would pick it.
    A lone job whose request would fit alone waits: the memory is held by something else.
    """
    if granted or not running or not waiting:
        return None
    need: dict[str, Request] = {}
    for r in waiting:
        if r.job_id not in need or r.nbytes > need[r.job_id].nbytes:
            need[r.job_id] = r
    if any(j.job_id not in need for j in running) or min(r.nbytes for r in waiting) <= headroom:
        return None
    for j in sorted(running, key=lambda j: j.started):
        r = need[j.job_id]
        alone = budget - j.usage
        if r.nbytes > alone:
            return Unblock(j.job_id, "fail", f"its {r.phase} phase needs a memory lease of {fmt(r.nbytes)}, but even "
                           f"running alone it would have only {fmt(max(alone, 0))} of the {fmt(budget)} budget: "
                           "raise the daemon's --budget, lower batch_size/max_length, or use dizo.projection: zo")
    if len(running) < 2:
        return None
    youngest = max(running, key=lambda j: (j.started, j.job_id))
    return Unblock(youngest.job_id, "pause", f"lease deadlock: every running job waits for a heavy-phase lease and "
                   f"none fits ({fmt(headroom)} free of the budget); paused to let the others finish theirs")
