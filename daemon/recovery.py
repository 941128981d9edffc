"""What the daemon does at start, before it serves: make its jobs what was last acknowledged.

The store is the first record of every job; each job directory's job.json is the second, and job
directories the store does not know come back as jobs. Jobs that were running when the previous
daemon died are queued to resume from their seed-logs (their orphaned workers are let finish their
checkpoint, then killed).
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edgezo.jobdir import JOB_RECORD, REPORT, SPEC
from edgezo.protocol import Control, JobState

from . import jobrecord
from .store import Job
from .supervisor import is_worker, reap_orphan

if TYPE_CHECKING:
    from .core import Daemon

log = logging.getLogger("edgezo.daemon")

_JOB_SEQ = re.compile(r"-([0-9]{1,12})$")  # job ids are {name}-{seq}


def restore_from_job_files(d: Daemon) -> None:
    """Each job directory's job.json is the daemon's second record of the job. Where it is newer
    than the store (a damaged WAL frame makes SQLite drop that commit and every later one, without
    a word: an acknowledged cancel came back undone), it wins, and the store is corrected."""
    for job in list(d.jobs.values()):
        newer = jobrecord.read(Path(job.job_dir))
        if newer is None or not isinstance(newer.version, int) or newer.version <= job.version:
            d.recorded[job.id] = jobrecord.decisive(job)
            continue
        if newer.id != job.id:
            continue
        log.warning("job %s: the store had version %d (%s), its job directory version %d (%s); the store lost "
                    "a change and is corrected from %s", job.id, job.version, job.state, newer.version,
                    newer.state, JOB_RECORD)
        d.jobs[job.id] = newer
        d.save(newer)
        d.event(newer, "restored", {"from": JOB_RECORD, "store_version": job.version,
                                    "version": newer.version})


def adopt_orphans(d: Daemon) -> int:
    """Job directories the store does not know (a lost or rolled-back database) come back as jobs:
    as their job.json recorded them, or, without one, done when their report says so, otherwise
    failed with a reason (never run by surprise). Their ids are never handed out again (a new job
    once picked up an old job's seed-log): returns the highest job number a directory carries."""
    floor = 0
    for path in sorted(d.jobs_dir.iterdir()):
        m = _JOB_SEQ.search(path.name)
        if m:
            floor = max(floor, int(m.group(1)))
        if path.name in d.jobs or not m or not (path / SPEC).is_file():
            continue
        recorded = jobrecord.read(path)
        if recorded is not None and recorded.id == path.name:  # the daemon's own record: exactly as acknowledged
            d.jobs[recorded.id] = recorded
            d.save(recorded)
            d.event(recorded, "restored", {"from": JOB_RECORD, "store_version": None,
                                           "version": recorded.version})
            log.warning("job %s was missing from the store; restored from %s as %s", path.name, JOB_RECORD,
                        recorded.state)
            continue
        try:
            spec = json.loads((path / SPEC).read_text())
            report = json.loads((path / REPORT).read_text()) if (path / REPORT).is_file() else {}
        except (OSError, ValueError) as e:
            log.warning("job directory %s is not in the store and unreadable (%s); left alone", path, e)
            continue
        done = report.get("status") == JobState.DONE
        job = Job(id=path.name, seq=int(m.group(1)), name=str(spec.get("name", path.name)), spec=spec,
                  job_dir=str(path),
                  created=path.stat().st_mtime, state=JobState.DONE if done else JobState.FAILED,
                  steps_total=int(spec.get("steps", 0) or 0), step=int(report.get("steps_done", 0) or 0),
                  reason="" if done else "adopted from its job directory after the store lost it; "
                  "`edgezo retry` resumes it from its seed-log")
        d.jobs[job.id] = job
        d.save(job)
        d.event(job, "adopted", {"job_dir": str(path), "report": bool(report)})
        log.warning("job %s was missing from the store; adopted from %s as %s", job.id, path, job.state)
    return floor


def resume_running(d: Daemon) -> None:
    """Jobs that were running when the previous daemon died resume from their seed-logs."""
    now = time.time()
    for job in d.jobs.values():
        if job.state != JobState.RUNNING:
            continue
        if job.pid and is_worker(job.pid, job.id):
            reap_orphan(job.pid)
        job.state, job.pid, job.control, job.phase = JobState.PAUSED, None, Control.RUN, ""
        job.reason = "resuming after daemon restart (from its seed-log)"
        job.queued_at = now
        job.heartbeat = None
        d.event(job, "recovered", {"step": job.step})
        d.save(job)
