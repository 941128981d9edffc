"""The daemon's read side as plain functions over a store: a job's report and memory timeline.

The API answers with them while the daemon runs; `StateDir` gives the same answers from a state
directory when no daemon does (the quickstart's daemon has stopped, a user unit is not running),
reading the store read-only and the job directories, so finished jobs stay queryable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgezo.protocol import FINAL, Control, JobState

from .store import Job, ReadOnlyStore, Store, default_state_dir, find_job, memory_summary

STOPPED_WHILE_RUNNING = "the daemon stopped while it ran; it resumes from its seed-log when a daemon starts"


def job_report(job_dir: Path, view: dict, daemon_memory: dict) -> dict:
    """The trainer's report.json (when it wrote one) plus the daemon's own memory accounting."""
    path = Path(job_dir) / "report.json"
    report: dict = {}
    if path.exists():
        try:
            report = json.loads(path.read_text())
        except ValueError:
            report = {}
    memory = report.get("memory") or {
        "meter": daemon_memory["meter"],
        "peak_bytes": daemon_memory["peak_bytes"],
        "avg_bytes": daemon_memory["avg_bytes"],
        "phases": daemon_memory["phases"],
    }
    memory["daemon"] = daemon_memory
    report.setdefault("status", view.get("state"))
    report.setdefault("steps_done", view.get("step"))
    report.setdefault("metrics", {})
    report["memory"] = memory
    report["job"] = view
    return report


def memory_timeline(store: Store, job: Job, budget: int | None, summary: dict) -> dict[str, Any]:
    """GET /jobs/{id}/memory: the job's samples, the device's usage over the same span, the budget."""
    samples = store.samples(job.id)
    t0 = samples[0][0] if samples else (job.started or time.time())
    t1 = samples[-1][0] if samples else t0
    dev = store.device_samples(t0, t1)
    return {
        "job": job.id,
        "budget_bytes": budget,
        "samples": [{"ts": ts, "bytes": b, "phase": p} for ts, b, p in samples],
        "device": [{"ts": s[0], "usage": s[1], "edgezo": s[2], "leased": s[3]} for s in dev],
        "summary": summary,
    }


def find_state_dir(explicit: str | Path | None = None) -> Path | None:
    """The state directory to read when no daemon answers: `explicit`, else the user-mode one, else
    the system one, whichever holds a store first."""
    candidates = [Path(explicit)] if explicit else [default_state_dir(True), default_state_dir(False)]
    for path in candidates:
        if (path / "edgezo.db").is_file():
            return path
    return None


class StateDir:
    """A state directory with no daemon on it, read-only: what `status`, `report` and `logs` show."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.store = ReadOnlyStore(self.path / "edgezo.db")
        self.jobs = {j.id: j for j in self.store.load_jobs()}

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> StateDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def find(self, ref: str) -> Job | None:
        return find_job(self.jobs, ref)

    def budget(self) -> int | None:
        """The budget the daemon last ran under (its last device sample)."""
        row = self.store.db.execute("SELECT budget FROM device_samples ORDER BY ts DESC LIMIT 1").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def memory(self, job: Job) -> dict[str, Any]:
        summary = memory_summary(self.store.samples(job.id))
        summary["meter"] = "daemon:stored"
        return summary

    def view(self, job: Job) -> dict[str, Any]:
        """The job as the daemon's GET /jobs/{id} showed it last; a job it left running is paused
        now (its worker checkpointed when the daemon went) and resumes when a daemon starts."""
        d = job.public()
        d.pop("spec")
        d["method"] = job.spec.get("method")
        d["model"] = job.spec.get("model")
        d["leases"] = []
        summary = self.memory(job)
        d["mem_peak"] = max(job.mem_peak, summary["peak_bytes"])
        d["mem_avg"] = summary["avg_bytes"]
        if job.state not in FINAL and job.state != JobState.QUEUED:
            d.update(state=JobState.PAUSED, pid=None, phase="", mem_now=0, control=Control.RUN)
            if job.state == JobState.RUNNING:
                d["reason"] = STOPPED_WHILE_RUNNING
        return d

    def listing(self) -> dict[str, Any]:
        """GET /jobs without the live device figures."""
        return {"jobs": [self.view(j) for j in sorted(self.jobs.values(), key=lambda j: j.seq)],
                "device": {"budget_bytes": None}}

    def report(self, job: Job) -> dict:
        daemon_memory = self.memory(job)
        daemon_memory["budget_bytes"] = self.budget()
        return job_report(Path(job.job_dir), self.view(job), daemon_memory)

    def timeline(self, job: Job) -> dict[str, Any]:
        return memory_timeline(self.store, job, self.budget(), self.memory(job))

    def log(self, job: Job) -> str:
        path = Path(job.job_dir) / "worker.log"
        return path.read_text(errors="replace") if path.exists() else ""
