"""Disk room: what a job will hold on disk at most, what it has still to write, and whether that fits
the free disk less what the running jobs have still to write.

Checked twice: at enqueue (a job that cannot fit is refused with the numbers, `NoDiskRoom`, the API's
507) and before a start (a queued job waits, its reason saying why). The arithmetic is in
`policies/disk.py`; this module gathers its inputs: the model's files, the spec, the job directories.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from edgezo.disk import job_disk_use
from edgezo.model_files import ModelFilesError, model_config, model_files
from edgezo.spec import DEFAULTS, SpecError
from policies import disk as disk_policy
from policies import memory as mem

from .store import Job


class NoDiskRoom(RuntimeError):
    """A job whose output and snapshots would not fit the free disk (the API answers 507)."""

    def __init__(self, message: str, need: int, free: int):
        super().__init__(message)
        self.need, self.free = need, free


def free_disk(path: Path) -> int:
    """Free bytes on `path`'s filesystem; 0 when it cannot be asked (counted as full)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def disk_need(spec: dict) -> disk_policy.DiskNeed:
    """What a job will hold on disk at most, from its model's safetensors headers (or, with none to
    read, its config) and its spec."""
    s = {**DEFAULTS, **spec}
    try:
        shapes, side = model_files(s["model"])
    except ModelFilesError as e:
        raise SpecError("model", str(e)) from None
    if shapes is None:
        shapes = disk_policy.llama_shapes(model_config(s["model"]) or mem.SMOLLM2_135M)
    return disk_policy.need(
        shapes, trainable=s["trainable"], precision=s["precision"], method=s["method"],
        steps=int(s["steps"] or 0), perturbations=int((s["optim"] or {}).get("perturbations", 1)),
        lora=s["lora"], snapshot_every=s["snapshot_every"], keep=int((s["snapshot"] or {}).get("keep", 1)),
        side_files=side)


class DiskRoom:
    """The disk side of admission for the job directories under `jobs_dir`; `running` names the jobs
    whose remaining writes are already promised."""

    def __init__(self, jobs_dir: Path, running: Callable[[], list[Job]]):
        self.jobs_dir, self._running = jobs_dir, running
        self._need: dict[str, disk_policy.DiskNeed] = {}  # job -> its most, computed once

    def job_need(self, job: Job) -> disk_policy.DiskNeed:
        need = self._need.get(job.id)
        if need is None:
            try:
                need = disk_need(job.spec)
            except SpecError:  # its model's files changed since enqueue: counted as needing nothing more
                need = disk_policy.DiskNeed(0, 0, 0, 0)
            self._need[job.id] = need
        return need

    def forget(self, job_id: str) -> None:
        self._need.pop(job_id, None)

    def left(self, job: Job) -> int:
        """What a job has still to write: its expected most, less what its directory holds already."""
        held = job_disk_use(Path(job.job_dir), job.spec.get("output"))["total_bytes"]
        return max(0, self.job_need(job).total - held)

    def free(self) -> tuple[int, int]:
        """(free bytes on the job directories' filesystem, what running jobs have still to write there)."""
        promised = sum(self.left(j) for j in self._running())
        return free_disk(self.jobs_dir), promised

    def check(self, spec: dict) -> None:
        """Refuse a job whose output and snapshots do not fit the free disk now, with the numbers."""
        need = disk_need(spec)
        free, promised = self.free()
        why = disk_policy.disk_wait(need.total, free, str(self.jobs_dir), need.describe(), promised)
        if why:
            raise NoDiskRoom(f"not queued: this job {why}; free some disk, train fewer tensors (trainable: lora or topK), "
                             "or, for a ZO method, take no snapshots (snapshot_every: 0: the seed-log alone "
                             "rebuilds the weights)", need.total, free - promised)

    def wait_reason(self, job: Job) -> tuple[str, int, int] | None:
        """Why a queued job cannot start yet (what it has still to write does not fit), with the bytes
        it needs and the bytes free; None when it fits."""
        need = self.job_need(job)
        left = self.left(job)
        free, promised = self.free()
        detail = need.describe() + (f"; {mem.fmt_bytes(need.total - left)} already written" if left < need.total else "")
        why = disk_policy.disk_wait(left, free, str(self.jobs_dir), detail, promised)
        return (why, left, free - promised) if why else None
