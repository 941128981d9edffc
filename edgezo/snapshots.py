"""When a job takes a snapshot, and which snapshots it keeps.

The seed-log alone rebuilds every ZO job's weights (replay redoes each logged update, no forward);
a snapshot only shortens that redo. So a snapshot is worth its disk (a full copy of the trainable
tensors) once redoing the updates since the last one would take longer than `snapshot.replay_s`:
the clock below adds up the measured time of every update the run makes (or replays on resume),
and a job short enough to replay in seconds never writes one. `method: fo` cannot be replayed; its
redo is rerunning the steps, so its clock adds up step times instead. `snapshot_every: N` is the
explicit override (every N steps, 0: never). Only the newest `snapshot.keep` survive, and older
ones are deleted only after the new one and its seed-log record are on disk.

Torch-free: the trainer hands in the device's synchronize when updates run asynchronously (CUDA).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgezo.jobdir import SNAPSHOTS

SNAPSHOT_DIR = SNAPSHOTS  # the job directory's snapshot folder
_FILE = re.compile(r"(step|optim)-([0-9]{8,})\.safetensors")


class SnapshotClock:
    """Seconds it would take to redo the work since the last snapshot, and whether one is due."""

    def __init__(self, every: int | None, replay_s: float, sync: Callable[[], Any] | None = None):
        self.every, self.replay_s, self.sync = every, float(replay_s), sync
        self.debt_s = 0.0  # measured redo time since the last snapshot

    @classmethod
    def from_spec(cls, spec: dict, sync: Callable[[], Any] | None = None) -> SnapshotClock:
        """A spec.json written before `snapshot` existed keeps its `snapshot_every` (and keeps one)."""
        policy = spec.get("snapshot") or {}
        return cls(spec.get("snapshot_every"), policy.get("replay_s", 60.0), sync)

    def add(self, seconds: float) -> None:
        self.debt_s += max(0.0, seconds)

    def timed(self, fn: Callable) -> Callable:
        """`fn` (an update) with its time added to the debt, the device's queue drained first."""
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync is not None:
                    self.sync()
                self.add(time.perf_counter() - t0)

        return run

    def watch(self, method: object) -> None:
        """Time every update `method` makes from now on, in a step or replayed from the seed-log
        (apply; DiZO's apply_projection): that is exactly what a replay would redo."""
        for name in ("apply", "apply_projection"):
            inner = getattr(method, name, None)
            if callable(inner):
                setattr(method, name, self.timed(inner))

    def due(self, steps_done: int) -> bool:
        if self.every is not None:
            return self.every > 0 and steps_done % self.every == 0
        return self.debt_s > self.replay_s

    def taken(self) -> None:
        self.debt_s = 0.0


def keep_count(spec: dict) -> int:
    return int((spec.get("snapshot") or {}).get("keep", 1))


def snapshot_files(job_dir: Path) -> dict[int, list[Path]]:
    """The snapshot files of a job directory by step (weights, and AdamW state for fo)."""
    out: dict[int, list[Path]] = {}
    d = Path(job_dir) / SNAPSHOT_DIR
    if d.is_dir():
        for f in d.iterdir():
            m = _FILE.fullmatch(f.name)
            if m:
                out.setdefault(int(m.group(2)), []).append(f)
    return out


def prune(job_dir: Path, keep: int) -> list[Path]:
    """Delete every snapshot but the newest `keep` (by step: numbers are never reused, a rollback
    included), and the temporary files a killed write left. Call only once the newest snapshot and
    its seed-log record are durable. Returns what was deleted."""
    gone = []
    by_step = snapshot_files(job_dir)
    for step in sorted(by_step)[:-keep] if keep > 0 else sorted(by_step):
        gone.extend(by_step[step])
    d = Path(job_dir) / SNAPSHOT_DIR
    if d.is_dir():
        gone.extend(f for f in d.iterdir() if f.suffix == ".tmp")
    for f in gone:
        f.unlink(missing_ok=True)
    if gone:
        fsync_dir(d)
    return gone


def fsync_dir(d: Path) -> None:
    """Make the renames and unlinks in `d` durable (a file's own fsync does not cover its name)."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
