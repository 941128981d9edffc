"""The daemon's SQLite store (WAL): jobs, their events, and memory samples.

The daemon is the only writer. Jobs live in memory as `Job` objects and are written through on
every change; events and samples are appended and read back for logs, reports and /metrics.
`ReadOnlyStore` reads the same file when no daemon runs (the CLI's fallback).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgezo.protocol import Control, JobState
from edgezo.timeweighted import summarize

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, seq INTEGER, data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, ts REAL NOT NULL,
    kind TEXT NOT NULL, data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS samples (
    job_id TEXT NOT NULL, ts REAL NOT NULL, bytes INTEGER NOT NULL, phase TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_job ON samples (job_id, ts);
CREATE TABLE IF NOT EXISTS device_samples (
    ts REAL NOT NULL, used INTEGER, edgezo INTEGER, leased INTEGER, free INTEGER, budget INTEGER
);
"""

def default_state_dir(user: bool) -> Path:
    """Where a daemon keeps its store and job directories: systemd's $STATE_DIRECTORY, else
    $XDG_STATE_HOME/edgezo or ~/.local/state/edgezo (user mode), else /var/lib/edgezo."""
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if user:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "edgezo"
    return Path("/var/lib/edgezo")


# queued: never ran; paused: ran before and resumes from its seed-log; running includes starting.


@dataclass
class Job:
    id: str
    seq: int
    name: str
    spec: dict
    job_dir: str
    created: float
    state: str = JobState.QUEUED
    queued_at: float = 0.0  # when it last became a candidate (bounded-wait clock)
    started: float | None = None
    finished: float | None = None
    step: int = 0  # steps done
    steps_total: int = 0
    steps_per_s: float | None = None
    loss: float | None = None
    reason: str = ""  # why it waits / paused / failed
    window: str | None = None
    not_before: float | None = None  # --at: not before this time
    estimate: int = 0
    measured: int | None = None  # steady footprint measured after the first step
    pid: int | None = None
    attempts: int = 0
    control: str = Control.RUN  # what the worker is told: run | pause | stop
    pause_reason: str = ""
    phase: str = ""
    mem_now: int = 0
    mem_peak: int = 0
    heartbeat: float | None = None
    owner_uid: int | None = None
    version: int = 0  # bumped on every change of state, control or allotment (see Daemon._save)

    def public(self) -> dict[str, Any]:
        return asdict(self)


JOB_FIELDS = {f.name for f in fields(Job)}


def find_job(jobs: dict[str, Job], ref: str) -> Job | None:
    """A job by id, else the newest job of that name (`edgezo report rt-sentiment` means the last one)."""
    if ref in jobs:
        return jobs[ref]
    named = [j for j in jobs.values() if j.name == ref]
    return max(named, key=lambda j: j.seq) if named else None


class StoreCorrupt(RuntimeError):
    """The database failed SQLite's own check; the daemon refuses to run on it (it would lose or
    mix up jobs) and says where the copy of the damaged files is."""


class DiskFull(Exception):
    """The state directory's filesystem is full: the change was not saved (the caller says so; a
    change the daemon made on its own is saved again once there is space)."""


def is_disk_full(e: BaseException) -> bool:
    """SQLite's "database or disk is full", or ENOSPC/EDQUOT from a file write."""
    if isinstance(e, DiskFull):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e)


@contextlib.contextmanager
def _write(db: sqlite3.Connection):
    """One write, rolled back if it fails (an open transaction left behind fails every later BEGIN);
    a full disk becomes `DiskFull`."""
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if is_disk_full(e):
            raise DiskFull(f"the disk holding the job store is full ({e})") from e
        raise


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # every spec and reason: the owner's only
        for f in (self.path, self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f, 0o600)  # SQLite gives the -wal and -shm files the database file's mode
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            (verdict,) = self.db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(verdict)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            with contextlib.suppress(Exception):
                self.db.close()
            if is_disk_full(e):  # not damage: nothing to copy aside (and no room to)
                raise DiskFull(f"the disk holding the job store {self.path} is full ({e}); free some space and "
                               "start the daemon again: nothing in the store is lost") from None
            saved = self._keep_damaged_copy()
            raise StoreCorrupt(f"the job store {self.path} is damaged ({e}); a copy is in {saved}. Move "
                               f"{self.path.name}* aside to start with an empty store: job directories are kept "
                               "and adopted again (as failed jobs you can `edgezo retry`)") from None

    def _keep_damaged_copy(self) -> Path:
        out = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        out.mkdir(exist_ok=True)
        for f in self.path.parent.glob(self.path.name + "*"):
            if f.is_file():
                shutil.copy2(f, out / f.name)
        return out

    def close(self) -> None:
        self.db.close()

    # jobs ------------------------------------------------------------------
    def save_job(self, job: Job) -> None:
        with _write(self.db):
            self.db.execute(
                "INSERT INTO jobs (id, seq, data) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE SET data=excluded.data",
                (job.id, job.seq, json.dumps(asdict(job))),
            )

    def load_jobs(self) -> list[Job]:
        out = []
        for (data,) in self.db.execute("SELECT data FROM jobs ORDER BY seq"):
            d = json.loads(data)
            out.append(Job(**{k: v for k, v in d.items() if k in JOB_FIELDS}))
        return out

    def next_seq(self) -> int:
        (n,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()
        return int(n)

    # events ----------------------------------------------------------------
    def add_event(self, job_id: str, ts: float, kind: str, data: dict) -> int:
        with _write(self.db):
            cur = self.db.execute(
                "INSERT INTO events (job_id, ts, kind, data) VALUES (?, ?, ?, ?)", (job_id, ts, kind, json.dumps(data))
            )
        return int(cur.lastrowid)

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        rows = self.db.execute(
            "SELECT id, ts, kind, data FROM events WHERE job_id=? AND id>? ORDER BY id LIMIT ?", (job_id, after, limit)
        )
        return [{"id": i, "ts": ts, "kind": k, "data": json.loads(d)} for i, ts, k, d in rows]

    # samples ---------------------------------------------------------------
    def add_samples(self, rows: list[tuple[str, float, int, str]], device: tuple | None) -> None:
        with _write(self.db):
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO samples (job_id, ts, bytes, phase) VALUES (?, ?, ?, ?)", rows)
            if device is not None:
                self.db.execute("INSERT INTO device_samples VALUES (?, ?, ?, ?, ?, ?)", device)
            self.db.execute("COMMIT")

    def samples(self, job_id: str) -> list[tuple[float, int, str]]:
        return list(self.db.execute("SELECT ts, bytes, phase FROM samples WHERE job_id=? ORDER BY ts", (job_id,)))

    def device_samples(self, since: float = 0.0, until: float | None = None) -> list[tuple]:
        until = float("inf") if until is None else until
        return list(
            self.db.execute(
                "SELECT ts, used, edgezo, leased, free, budget FROM device_samples WHERE ts>=? AND ts<=? ORDER BY ts",
                (since, until),
            )
        )


class ReadOnlyStore(Store):
    """The store opened read-only, for `edgezo status`/`report`/`logs` when no daemon answers: jobs,
    events and samples as the daemon left them. Nothing is checked, repaired or locked. A daemon that
    stopped cleanly left no write-ahead log: the file is then read as immutable, since a read-only
    WAL reader would create empty -wal/-shm files beside it; with a log (a killed daemon), SQLite's
    `mode=ro` reads it too, never writing the database or the log (only the -shm index, where every
    reader keeps its read marks), and a daemon starting meanwhile is never blocked by the reader."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no job store at {self.path}")
        wal = self.path.with_name(self.path.name + "-wal").exists()
        uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
        try:
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self.db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            raise StoreCorrupt(f"cannot read the job store {self.path}: {e}") from None


def memory_summary(samples: list[tuple[float, int, str]]) -> dict[str, Any]:
    """Peak and time-weighted average, overall and per phase, of a job's samples (edgezo.timeweighted)."""
    return summarize(samples)
