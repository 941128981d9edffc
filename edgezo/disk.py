"""What a job directory holds on disk now, by kind. Torch-free (the daemon imports it). What a job
will hold at most is computed from its model's files (`edgezo.model_files`) in `policies/disk.py`."""

from __future__ import annotations

import os
from pathlib import Path

from edgezo.jobdir import EVENTS, SEEDLOG
from edgezo.jobdir import SNAPSHOTS as SNAPSHOT_DIR

JOURNAL_FILES = (SEEDLOG, EVENTS)  # what rebuilds the job (and its history)


def _tree_bytes(path: Path) -> int:
    """Apparent size of a file, or of every file under a directory (links not followed)."""
    try:
        if not path.is_dir():
            return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # deleted while we looked (a snapshot being pruned)
    return total


def job_disk_use(job_dir: Path, output: str | None) -> dict:
    """Bytes a job directory holds now: total, and output / snapshots / seed-log (+ events) / other."""
    job_dir = Path(job_dir)
    out_bytes = _tree_bytes(job_dir / output) if output else 0
    snaps = _tree_bytes(job_dir / SNAPSHOT_DIR)
    journal = sum(_tree_bytes(job_dir / f) for f in JOURNAL_FILES)
    total = _tree_bytes(job_dir)
    count = 0
    if (job_dir / SNAPSHOT_DIR).is_dir():
        count = sum(1 for f in (job_dir / SNAPSHOT_DIR).iterdir() if f.name.startswith("step-"))
    return {"total_bytes": total, "output_bytes": out_bytes, "snapshot_bytes": snaps, "snapshots": count,
            "seedlog_bytes": journal, "other_bytes": max(0, total - out_bytes - snaps - journal)}
