"""The daemon's second record of a job: `job.json` in its job directory.

SQLite can lose acknowledged commits without a word (a damaged WAL frame drops that commit and every
later one) or be lost whole. Each change that matters (state, control, allotment) is therefore also
written, versioned, beside the job's seed-log; at start the newer of the two wins, and a job
directory the store does not know comes back as its record says (see Daemon.open).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

from edgezo.jobdir import JOB_RECORD, read_json, write_json_atomic

from .store import JOB_FIELDS, Job


def decisive(job: Job) -> tuple:
    """The parts of a job that a lost store must not lose (progress comes back from the seed-log)."""
    return (job.state, job.control, job.pause_reason, job.finished, job.attempts, job.not_before,
            job.spec.get("budget"), job.window)


def write(job: Job) -> None:
    with contextlib.suppress(OSError):  # a full disk or a removed directory: the store still has it
        write_json_atomic(Path(job.job_dir) / JOB_RECORD, asdict(job), indent=None)


def read(job_dir: Path) -> Job | None:
    """The job as its directory's record has it; None when there is none or it is not a job."""
    record = read_json(Path(job_dir) / JOB_RECORD)
    if record is None:
        return None
    try:
        return Job(**{k: v for k, v in record.items() if k in JOB_FIELDS})
    except TypeError:
        return None
