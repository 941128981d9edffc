"""The socket API: routes over the daemon. Every endpoint answers `curl --unix-socket`.

Reads are open to anyone who can connect; routes marked mutating need root, the daemon's user or
the socket's group (SO_PEERCRED, checked in daemon.http).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import edgezo
from edgezo.disk import job_disk_use
from edgezo.nvml import rss_bytes
from edgezo.protocol import FINAL, JobState
from edgezo.spec import SpecError
from policies.memory import fmt_bytes

from . import views
from .core import Daemon
from .diskroom import NoDiskRoom
from .http import HTTPError, Request, Response, Router
from .store import DiskFull, Job


def build_router(d: Daemon) -> Router:
    r = Router()

    def job_of(req: Request) -> Job:
        job = d.find(req.params["id"])
        if job is None:
            raise HTTPError(404, f"no job {req.params['id']!r}")
        return job

    async def index(req: Request) -> Response:
        return Response(body={
            "service": "edgezo",
            "version": edgezo.__version__,
            "endpoints": [
                "GET /health", "GET /jobs", "POST /jobs", "GET /jobs/{id}", "POST /jobs/{id}/cancel",
                "POST /jobs/{id}/retry",
                "DELETE /jobs/{id}", "GET /jobs/{id}/events[?after=N&follow=1]", "GET /jobs/{id}/logs[?follow=1]",
                "GET /jobs/{id}/report", "GET /jobs/{id}/memory", "GET /device", "GET /leases", "POST /leases",
                "DELETE /leases/{job}/{phase}", "GET /metrics", "GET /debug/modules",
            ],
        })

    async def health(req: Request) -> Response:
        return Response(body={
            "ok": True,
            "version": edgezo.__version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - d.started, 3),
            "rss_bytes": rss_bytes(),
            "torch_loaded": "torch" in sys.modules,
            "socket": str(d.cfg.socket_path),
            "state_dir": str(d.state_dir),
            "stopping": d.stopping,
            "loop_errors": d.loop_errors,  # loop iterations that failed and were retried
            "last_loop_error": d.last_loop_error,  # empty once an iteration succeeds again
            "disk_full_writes": d.disk_full_writes,  # store writes a full disk refused
            "unsaved_jobs": sorted(d._unsaved),  # job changes in effect, waiting for room to be saved
        })

    async def modules(req: Request) -> Response:
        return Response(body={"modules": sorted(sys.modules)})

    async def list_jobs(req: Request) -> Response:
        state = req.query.get("state")
        jobs = [d.job_view(j) for j in d.jobs.values() if not state or j.state == state]
        return Response(body={"jobs": jobs, "device": _device_brief(d)})

    async def create_job(req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
            raise HTTPError(400, 'expected {"spec": {...}, "set": [...], "window": "CRON", "at": "CRON"}')
        try:
            job = d.enqueue(body["spec"], sets=body.get("set"), window=body.get("window"), at=body.get("at"),
                            owner_uid=req.peer.uid if req.peer else None)
        except SpecError as e:
            return Response(422, {"error": str(e), "field": e.field, "message": e.message})
        except DiskFull as e:
            raise HTTPError(507, str(e)) from None
        except NoDiskRoom as e:  # 507 Insufficient Storage
            return Response(507, {"error": str(e), "need_bytes": e.need, "free_bytes": e.free})
        except RuntimeError as e:
            raise HTTPError(503, str(e)) from None
        return Response(201, d.job_view(job))

    async def get_job(req: Request) -> Response:
        job = job_of(req)
        view = d.job_view(job)
        view["spec"] = job.spec
        return Response(body=view)

    async def cancel_job(req: Request) -> Response:
        try:
            return Response(body=d.job_view(d.cancel(job_of(req))))
        except DiskFull as e:
            raise HTTPError(507, str(e)) from None

    async def retry_job(req: Request) -> Response:
        body = req.json()
        budget = body.get("budget") if isinstance(body, dict) else None
        try:
            job = d.retry(job_of(req), None if budget is None else str(budget))
        except SpecError as e:
            return Response(422, {"error": str(e), "field": e.field, "message": e.message})
        except ValueError as e:
            raise HTTPError(409, str(e)) from None
        except DiskFull as e:
            raise HTTPError(507, str(e)) from None
        return Response(body=d.job_view(job))

    async def events(req: Request) -> Response:
        job = job_of(req)
        after = int(req.query.get("after", 0))
        if req.query.get("follow") not in ("1", "true", "yes"):
            return Response(body={"events": d.store.events(job.id, after, int(req.query.get("limit", 1000)))})
        return Response(content_type="application/x-ndjson", stream=_follow_events(d, job, after))

    async def logs(req: Request) -> Response:
        job = job_of(req)
        path = Path(job.job_dir) / "worker.log"
        offset = int(req.query.get("offset", 0))
        if req.query.get("follow") not in ("1", "true", "yes"):
            text = path.read_bytes()[offset:] if path.exists() else b""
            return Response(body=text, content_type="text/plain; charset=utf-8")
        return Response(content_type="text/plain; charset=utf-8", stream=_follow_file(d, job, path, offset))

    async def report(req: Request) -> Response:
        job = job_of(req)
        return Response(body=job_report(d, job))

    async def memory(req: Request) -> Response:
        job = job_of(req)
        return Response(body=views.memory_timeline(d.store, job, d.budget, d.memory(job)))

    async def device(req: Request) -> Response:
        return Response(body=d.device_view())

    async def list_leases(req: Request) -> Response:
        now = time.time()
        return Response(body={"leases": [lease.public(now) for lease in d.leases.leases.values()],
                              "enabled": d.cfg.leases, "policy": d.cfg.lease_policy,
                              "headroom_bytes": d.scheduler.headroom()})

    async def create_lease(req: Request) -> Response:
        body = req.json()
        job = d.find(str(body.get("job", "")))
        if job is None or job.state != JobState.RUNNING:
            raise HTTPError(409, f"no running job {body.get('job')!r}")
        try:
            nbytes = int(body.get("bytes", 0))
        except (TypeError, ValueError):
            raise HTTPError(400, "bytes must be an integer") from None
        phase = str(body.get("phase") or "heavy")
        lease = d.lease_request(job, phase, max(nbytes, 0))
        out = lease.public(time.time())
        out["granted"] = lease.granted is not None
        out["control"] = job.control
        return Response(200 if lease.granted is not None else 202, out)

    async def delete_lease(req: Request) -> Response:
        job = job_of(req)
        lease = d.lease_release(job, req.params["phase"])
        return Response(body={"released": lease is not None, "control": job.control})

    async def post_event(req: Request) -> Response:
        job = job_of(req)
        body = req.json()
        kind = str(body.get("kind", ""))
        if not kind:
            raise HTTPError(400, 'expected {"kind": ..., "data": {...}}')
        try:
            return Response(body=d.worker_event(job, kind, body.get("data") or {}))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    async def heartbeat(req: Request) -> Response:
        try:
            return Response(body=d.heartbeat(job_of(req), req.json()))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    async def metrics(req: Request) -> Response:
        return Response(body=prometheus(d), content_type="text/plain; version=0.0.4; charset=utf-8")

    r.add("GET", "/", index)
    r.add("GET", "/health", health)
    r.add("GET", "/debug/modules", modules)
    r.add("GET", "/jobs", list_jobs)
    r.add("POST", "/jobs", create_job, mutating=True)
    r.add("GET", "/jobs/{id}", get_job)
    r.add("DELETE", "/jobs/{id}", cancel_job, mutating=True)
    r.add("POST", "/jobs/{id}/cancel", cancel_job, mutating=True)
    r.add("POST", "/jobs/{id}/retry", retry_job, mutating=True)
    r.add("GET", "/jobs/{id}/events", events)
    r.add("POST", "/jobs/{id}/events", post_event, mutating=True)
    r.add("POST", "/jobs/{id}/heartbeat", heartbeat, mutating=True)
    r.add("GET", "/jobs/{id}/logs", logs)
    r.add("GET", "/jobs/{id}/report", report)
    r.add("GET", "/jobs/{id}/memory", memory)
    r.add("GET", "/device", device)
    r.add("GET", "/leases", list_leases)
    r.add("POST", "/leases", create_lease, mutating=True)
    r.add("DELETE", "/leases/{id}/{phase}", delete_lease, mutating=True)
    r.add("GET", "/metrics", metrics)
    return r


def _device_brief(d: Daemon) -> dict:
    dev = d.device
    return {
        "source": dev.source if dev else None,
        "budget_bytes": d.budget,
        "usage_bytes": dev.usage if dev else None,
        "headroom_bytes": d.scheduler.headroom() if dev else None,
    }


async def _follow_events(d: Daemon, job: Job, after: int) -> AsyncIterator[bytes]:
    while True:
        batch = d.store.events(job.id, after)
        for ev in batch:
            after = ev["id"]
            yield (json.dumps(ev) + "\n").encode()
        if not batch:
            if job.state in FINAL or d.stopping:
                return
            await asyncio.sleep(0.2)


async def _follow_file(d: Daemon, job: Job, path: Path, offset: int) -> AsyncIterator[bytes]:
    while True:
        chunk = b""
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(65536)
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        if job.state in FINAL or d.stopping:
            return
        await asyncio.sleep(0.2)


def job_report(d: Daemon, job: Job) -> dict:
    """The trainer's report.json (when it wrote one) plus the daemon's own memory accounting."""
    report = views.job_report(Path(job.job_dir), d.job_view(job), {**d.memory(job), "budget_bytes": d.budget})
    report["disk"] = job_disk_use(Path(job.job_dir), job.spec.get("output"))  # now, not at the job's end
    return report


def prometheus(d: Daemon) -> str:
    dev = d.device
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP edgezo_{name} {help_}")
        lines.append(f"# TYPE edgezo_{name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            lines.append(f"edgezo_{name}{{{lab}}} {value}" if lab else f"edgezo_{name} {value}")

    if dev:
        src = {"source": dev.source}
        metric("device_total_bytes", "gauge", "Device memory (system memory when there is no GPU).", [(src, dev.total)])
        metric("device_used_bytes", "gauge", "Device memory in use, every process.", [(src, dev.used)])
        metric("budget_bytes", "gauge", "The daemon's memory budget.", [({}, d.budget)])
        metric("usage_bytes", "gauge", "Memory counted against the budget.", [({}, dev.usage)])
        metric("headroom_bytes", "gauge", "What a new job or lease may take now.", [({}, d.scheduler.headroom())])
        metric("external_bytes", "gauge", "Device memory used outside edgezo workers.", [({}, dev.external)])
    states = tuple(JobState)
    counts = {s: 0 for s in states}
    for j in d.jobs.values():
        counts[j.state] = counts.get(j.state, 0) + 1
    metric("jobs", "gauge", "Jobs by state.", [({"state": s}, n) for s, n in counts.items()])
    running = [j for j in d.jobs.values() if j.state == JobState.RUNNING]
    metric("job_memory_bytes", "gauge", "A running job's measured memory.", [({"job": j.id}, j.mem_now) for j in running])
    metric("job_memory_peak_bytes", "gauge", "A running job's peak memory.", [({"job": j.id}, j.mem_peak) for j in running])
    metric("job_step", "gauge", "Steps done.", [({"job": j.id}, j.step) for j in running])
    metric("job_steps_per_second", "gauge", "Training speed.",
           [({"job": j.id}, j.steps_per_s or 0) for j in running])
    metric("leases", "gauge", "Leases by state.", [
        ({"state": "granted"}, len(d.leases.granted())), ({"state": "waiting"}, len(d.leases.waiting()))])
    metric("leased_bytes", "gauge", "Granted lease bytes.", [({}, sum(x.nbytes for x in d.leases.granted()))])
    metric("lease_grants_total", "counter", "Leases granted since start.", [({}, d.leases.granted_total)])
    metric("lease_wait_seconds_total", "counter", "Time requests waited for a lease.",
           [({}, round(d.leases.wait_s_total, 3))])
    metric("daemon_rss_bytes", "gauge", "The daemon's own RSS.", [({}, rss_bytes())])
    return "\n".join(lines) + "\n"


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["build_router", "job_report", "prometheus", "fmt_bytes"]
