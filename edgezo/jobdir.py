"""Every file in a job directory, named once, and the one way to write them that a crash cannot tear.

A job directory is the job: the daemon's store can be lost and the job comes back from it
(job.json), a worker resumes from it (seedlog.ezl), and `edgezo report`/`replay`/`export` read it
with no daemon. Stdlib only: the daemon, the worker and the CLI all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

SPEC = "spec.json"  # the validated spec (written once, at enqueue or `edgezo run`)
JOB_RECORD = "job.json"  # the daemon's second record of the job (state, control, allotment, version)
SEEDLOG = "seedlog.ezl"  # the checkpoint: header and one record per step
EVENTS = "events.jsonl"  # the worker's events (evals, snapshots, rollbacks), one JSON object a line
MEMORY_LOG = "memory.jsonl"  # the worker's own memory samples
REPORT = "report.json"  # written last, when the job is done
FAILURE = "failure.json"  # why the worker failed: {"type", "reason", "exception"}
WORKER_LOG = "worker.log"  # the worker's stdout and stderr under the daemon
SNAPSHOTS = "snapshots"  # full trainable-weight snapshots that bound replay time
SYNTHETIC_LOG = "synthetic.log"  # the synthetic test engine's progress log

# what a job directory holds besides the output: an output of the same name would overwrite it
JOB_FILES = frozenset({SPEC, JOB_RECORD, SEEDLOG, EVENTS, MEMORY_LOG, REPORT, FAILURE, WORKER_LOG, SNAPSHOTS,
                       SYNTHETIC_LOG})


def write_json_atomic(path: Path, data: Any, indent: int | None = 2, fsync: bool = True) -> None:
    """Write `path` so that a reader (or a crash) sees the old file or the new one, never a torn one:
    a temporary file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=indent) + "\n")
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
