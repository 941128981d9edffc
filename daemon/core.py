"""The daemon: its jobs and the actions on them, the asyncio loop, and the worker protocol.

One loop samples the device every `sample_s`, then `tick()` has the scheduler (daemon/scheduler.py)
take every decision from that one sample, in a fixed order; the decisions are pure functions in
`policies/`. What this class keeps: the job table and the two records of each job (store and
job.json), the job commands the API calls (enqueue, cancel, retry), what a worker says (events,
heartbeats, leases) and what its exit means. Processes are daemon/supervisor.py's, start-up
recovery daemon/recovery.py's, disk room daemon/diskroom.py's, memory figures daemon/accounting.py's.
It never imports torch. It is longer than the other modules because the job table and its
actions are one concept: every change of a job goes through `save` here, which is what makes a
job's two records agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgezo.jobdir import FAILURE, REPORT, SPEC, read_json, write_json_atomic
from edgezo.model_files import check_trainable, model_config
from edgezo.protocol import (
    ACTIVE,
    FINAL,
    Control,
    Event,
    Exit,
    JobState,
    Phase,
    checked_event,
    checked_fields,
)
from edgezo.spec import SpecError, load_spec
from policies import memory as mem

from . import access, jobrecord, recovery, sdnotify, windows
from .accounting import MemoryAccounts
from .diskroom import DiskRoom, free_disk
from .leases import Lease, LeaseBroker
from .monitor import DeviceState, Monitor
from .scheduler import Scheduler
from .store import DiskFull, Job, Store, StoreCorrupt, find_job
from .store import is_disk_full as store_is_disk_full
from .supervisor import Supervisor

log = logging.getLogger("edgezo.daemon")

@dataclass
class Config:
    state_dir: Path
    socket_path: Path
    budget: int | None = None  # None: 90% of the device's total
    reserve: int = 256 * mem.MiB  # device memory never handed out (external-pressure margin)
    disk_reserve: int = 256 * mem.MiB  # no job starts with less free disk under the state directory
    sample_s: float = 0.5
    heartbeat_s: float = 2.0
    lease_ttl_s: float = 10.0
    lease_policy: str = "fifo"
    lease_max_wait_s: float = 30.0
    admit_max_wait_s: float = 600.0
    leases: bool = True
    pressure_grace_s: float = 5.0
    max_jobs: int | None = None
    retries: int = 0  # re-run a worker killed by a signal this many times
    stop_timeout_s: float = 30.0
    cancel_grace_s: float = 10.0
    device_index: int = 0
    device_source: str | None = None  # "system": count system memory even where a GPU answers
    engine: str | None = None  # worker engine override (EDGEZO_ENGINE), e.g. "synthetic"
    runtime_overhead: int | None = None
    socket_group: str = "edgezo"


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.store: Store | None = None
        self.jobs: dict[str, Job] = {}
        self.workers = Supervisor(cfg, on_started=self._worker_started, on_exit=self._finish)
        self.monitor = Monitor(cfg.device_index, cfg.device_source)
        self.leases = LeaseBroker(policy_name=cfg.lease_policy, max_wait_s=cfg.lease_max_wait_s,
                                  ttl_s=cfg.lease_ttl_s, enabled=cfg.leases)
        self.device: DeviceState | None = None
        self.budget = 0
        self.started = time.time()
        self.stopping = False
        self.failing: dict[str, str] = {}  # job -> why the daemon is stopping it as failed
        self.timers = windows.Timers(self.wake)
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._lock_fd: int | None = None
        self._last_status = ""
        self.group_gid = access.group_id(cfg.socket_group)
        self.ticks = 0
        self.loop_errors = 0  # loop iterations that raised and were retried (see _loop_failed)
        self.last_loop_error = ""
        self._loop_error_logged = 0.0
        self._sampled: dict[str, set[str]] = {}  # job -> the phases its memory samples cover
        self._seq_floor = 0  # the highest job number any job directory carries (see recovery.adopt_orphans)
        self.accounts = MemoryAccounts(lambda job_id: self.store.samples(job_id) if self.store else [])
        self._unsaved: set[str] = set()  # jobs whose last change a full disk kept out of the store
        self.recorded: dict[str, tuple] = {}  # job -> what its job.json last recorded (see save)
        self.disk_full_writes = 0  # store writes a full disk refused (events and samples are dropped)
        self._disk_full_logged = 0.0
        self.disk = DiskRoom(self.jobs_dir, self.running)
        self.scheduler = Scheduler(self)
        self._worker_phase: dict[str, str] = {}  # job -> the phase its worker last stated
        self._phase_seq: dict[str, int] = {}  # job -> the sequence number of that statement

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """State directory, lock, store, recovery; no sockets yet (tests can drive this directly)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another edgezo daemon holds {self.state_dir}") from None
        try:
            self.store = Store(self.state_dir / "edgezo.db")
        except (StoreCorrupt, DiskFull) as e:
            raise SystemExit(str(e)) from None
        self.device = self.monitor.sample(time.time(), {})
        self.budget = self.cfg.budget or int(self.device.total * 0.9)
        for job in self.store.load_jobs():
            self.jobs[job.id] = job
        recovery.restore_from_job_files(self)
        self._seq_floor = recovery.adopt_orphans(self)
        recovery.resume_running(self)

    async def run(self, socks: list[socket.socket], server) -> int:
        """Serve until SIGTERM/SIGINT; then stop workers at a step boundary and exit."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        for s in socks:
            await server.serve(s)
        self.timers.start()
        for job in self.jobs.values():
            if job.state in ACTIVE and (job.window or job.not_before):
                self._watch_time(job)
        self.tick(time.time())
        sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self._status_line()}")
        log.info("edgezo daemon ready on %s (budget %s, meter %s)", self.cfg.socket_path,
                 mem.fmt_bytes(self.budget), self.device.source if self.device else "?")
        watchdog = sdnotify.watchdog_interval()
        last_dog = 0.0
        last_sample = 0.0
        while not self.stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.sample_s)
            self._wake.clear()
            now = time.time()
            try:  # one bad sample or tick (a full disk, no file descriptors left) must not end the daemon
                if now - last_sample >= self.cfg.sample_s * 0.9:
                    last_sample = now
                    self.sample(now)
                self.tick(now)
                self.last_loop_error = ""
            except Exception as e:
                self._loop_failed(e, now)
            if watchdog and now - last_dog >= watchdog:
                sdnotify.notify("WATCHDOG=1")
                last_dog = now
        sdnotify.notify("STOPPING=1\nSTATUS=stopping: pausing workers at a step boundary")
        await self._shutdown()
        await server.close()
        self.timers.stop()
        if self.store:
            self.store.close()
        self._stopped.set()
        return 0

    def _loop_failed(self, error: Exception, now: float) -> None:
        """Log a failed loop iteration (with its traceback once a minute, a count in between) and go on:
        the next iteration retries, and `edgezo status` shows the last error until one succeeds."""
        self.loop_errors += 1
        self.last_loop_error = f"{type(error).__name__}: {error}"
        if now - self._loop_error_logged >= 60:
            log.exception("daemon loop iteration failed (%d so far); retrying", self.loop_errors)
            self._loop_error_logged = now

    def request_stop(self) -> None:
        if not self.stopping:
            log.info("stopping: no new jobs; asking workers to checkpoint")
            self.stopping = True
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def _shutdown(self) -> None:
        for job in self.running():
            job.control = Control.PAUSE
            job.pause_reason = "daemon stopped; resumes when it starts again"
            self.save(job)
        await self.workers.wait_all(self.cfg.stop_timeout_s)

    # ------------------------------------------------------------------ jobs
    def running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == JobState.RUNNING]

    def save(self, job: Job) -> None:
        """Write a job through to the store. On a full disk the change stays in memory (it is in
        effect) and is written again each tick until there is room; see `_persist` for changes a
        client waits to have acknowledged."""
        if not self.store:
            return
        decisive = jobrecord.decisive(job)
        if self.recorded.get(job.id) != decisive:  # state, control or allotment changed: record it twice
            job.version += 1
            self.recorded[job.id] = decisive
            jobrecord.write(job)
        try:
            self.store.save_job(job)
            self._unsaved.discard(job.id)
        except DiskFull as e:
            self._unsaved.add(job.id)
            self._disk_full(e)

    def _persist(self, job: Job) -> None:
        """`_save` for a change a client asked for: a full disk is the client's answer (HTTP 507)."""
        self.save(job)
        if job.id in self._unsaved:
            raise DiskFull(f"the disk under {self.state_dir} is full: the change to {job.id} is in effect but not "
                           "saved yet (it is saved once there is room; a daemon restart before that would lose it)")

    def _save_unsaved(self) -> None:
        for job_id in list(self._unsaved):
            if job_id in self.jobs:
                self.save(self.jobs[job_id])
            else:
                self._unsaved.discard(job_id)

    def event(self, job: Job, kind: str, data: dict) -> None:
        if self.store:
            try:
                self.store.add_event(job.id, time.time(), kind, data)
            except DiskFull as e:
                self._disk_full(e)

    def _disk_full(self, error: Exception) -> None:
        """Count a write a full disk refused; log it once a minute, not once a sample."""
        self.disk_full_writes += 1
        now = time.time()
        if now - self._disk_full_logged >= 60:
            log.warning("%s; %d writes refused so far (job changes are kept and saved once there is room)",
                        error, self.disk_full_writes)
            self._disk_full_logged = now

    def find(self, ref: str) -> Job | None:
        return find_job(self.jobs, ref)

    def enqueue(self, raw: dict, *, sets: list[str] | None = None, window: str | None = None,
                at: str | None = None, owner_uid: int | None = None) -> Job:
        if self.stopping:
            raise RuntimeError("the daemon is stopping")
        spec = load_spec(raw, sets)
        window = window or spec.get("window")
        for field, expr in (("window", window), ("at", at)):
            if expr:
                try:
                    windows.validate(expr)
                except ValueError as e:
                    raise SpecError(field, str(e)) from None
        spec["window"] = window
        self._check_own_budget(spec)
        access.check_paths(spec, owner_uid)
        check_trainable(spec)
        self.disk.check(spec)
        assert self.store is not None
        seq = max(self.store.next_seq(), self._seq_floor + 1)  # never an id a job directory already had
        job_id = f"{spec['name']}-{seq}"
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=False)
        self._seq_floor = seq
        now = time.time()
        job = Job(id=job_id, seq=seq, name=spec["name"], spec=spec, job_dir=str(job_dir), created=now,
                  queued_at=now, steps_total=int(spec["steps"]), window=window, owner_uid=owner_uid)
        if at:
            nxt = windows.next_fire(at, datetime.now(timezone.utc))
            job.not_before = nxt.timestamp() if nxt else None
        # a job's own `budget` declares its allotment; otherwise the model-based estimate
        job.estimate = int(spec["budget"]) if spec.get("budget") else self.estimate(spec).steady
        try:  # acknowledged only once durable: on a full disk the client hears so and nothing is queued
            write_json_atomic(job_dir / SPEC, spec)
            job.version, self.recorded[job.id] = 1, jobrecord.decisive(job)
            jobrecord.write(job)
            self.store.save_job(job)
        except (OSError, DiskFull) as e:
            shutil.rmtree(job_dir, ignore_errors=True)
            if isinstance(e, DiskFull) or store_is_disk_full(e):
                raise DiskFull(f"the disk under {self.state_dir} is full: the job was not queued "
                               f"({mem.fmt_bytes(free_disk(self.jobs_dir))} free)") from e
            raise
        self.jobs[job.id] = job
        self.event(job, "enqueued", {"estimate_bytes": job.estimate, "window": window, "not_before": job.not_before})
        self._watch_time(job)
        self.wake()
        return job

    def _watch_time(self, job: Job) -> None:
        at = datetime.fromtimestamp(job.not_before, timezone.utc) if job.not_before else None
        if job.window or at:
            self.timers.watch(job.id, window=job.window, at=at)

    def estimate(self, spec: dict) -> mem.Footprint:
        """The job's footprint from its model's config (a directory's, a GGUF's header, the packaged
        default's); a model with none to read is estimated as the packaged default."""
        on_gpu = self.device is not None and self.device.source == "nvml" and spec.get("device") != "cpu"
        return mem.estimate(
            model_config(spec["model"]) or mem.SMOLLM2_135M,
            precision=spec["precision"],
            trainable=spec["trainable"],
            batch_size=spec["batch_size"],
            max_length=spec["max_length"],
            method=spec["method"],
            device="cuda" if on_gpu else "cpu",
            runtime_overhead=self.cfg.runtime_overhead,
            task_type=(spec.get("task") or {}).get("type", "classification"),
            lora=spec.get("lora"),
            checkpointing=bool((spec.get("dizo") or {}).get("checkpointing")),
            dizo_layers=(spec.get("dizo") or {}).get("layers"),
            anchor_in_memory=str(spec["model"]).endswith(".gguf"),
        )

    def cancel(self, job: Job) -> Job:
        if job.state in FINAL:
            return job
        if job.state == JobState.RUNNING:
            job.control = Control.STOP
            job.reason = "cancelling: waiting for the worker to stop at a step boundary"
            self.workers.escalate_later(job.id)
        else:
            job.state, job.finished, job.reason = JobState.CANCELLED, time.time(), "cancelled before it ran"
            self.timers.forget(job.id)
            self.disk.forget(job.id)
        self.event(job, "cancel", {"state": job.state})
        self.wake()
        self._persist(job)
        return job

    def _check_own_budget(self, spec: dict) -> None:
        """A job that needs more than the whole device budget would wait forever, and every job queued
        after it behind it: refuse it now, with the numbers. A declared `budget` is the job's own word
        (and the way past an estimate that is too cautious); without one, the model-based estimate."""
        if not self.budget:
            return
        if spec.get("budget"):
            if int(spec["budget"]) > self.budget:
                raise SpecError("budget", f"{mem.fmt_bytes(int(spec['budget']))} is more than this daemon's whole "
                                f"budget ({mem.fmt_bytes(self.budget)}); lower it or start the daemon with a larger "
                                "--budget")
            return
        fp = self.estimate(spec)
        if fp.steady > self.budget:
            raise SpecError("model", f"this job is estimated to need {mem.fmt_bytes(fp.steady)} (weights "
                            f"{mem.fmt_bytes(fp.weights)}, one forward at batch_size {spec['batch_size']} and max_length "
                            f"{spec['max_length']} {mem.fmt_bytes(fp.activations)}, runtime {mem.fmt_bytes(fp.runtime)}), "
                            f"more than this daemon's whole budget ({mem.fmt_bytes(self.budget)}); lower batch_size or "
                            "max_length, train in int8 with lora, start the daemon with a larger --budget, or declare "
                            "`budget:` if you know it fits")

    def wait_for_disk(self, job: Job) -> bool:
        """True (and the job's reason says why, with the numbers) when what it has still to write does
        not fit the free disk, less what running jobs have still to write."""
        waiting = self.disk.wait_reason(job)
        if waiting and job.reason != f"waiting: {waiting[0]}":
            job.reason = f"waiting: {waiting[0]}"
            self.event(job, "disk-wait", {"reason": job.reason, "need_bytes": waiting[1], "free_bytes": waiting[2]})
            self.save(job)
        return waiting is not None

    def retry(self, job: Job, budget: str | None = None) -> Job:
        """Queue a failed or cancelled job again; its worker resumes from the seed-log, so no step
        done is lost. `budget` replaces the job's own budget (it is not part of the spec hash)."""
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            raise ValueError(f"job {job.id} is {job.state}; only failed or cancelled jobs can be retried")
        if budget is not None:
            value = None if budget.strip().lower() in ("", "null", "none") else budget
            spec = load_spec({**job.spec, "budget": value})  # SpecError names the field
            self._check_own_budget(spec)
            job.spec["budget"] = spec["budget"]
            write_json_atomic(Path(job.job_dir) / SPEC, job.spec)
            job.estimate = int(spec["budget"]) if spec["budget"] else self.estimate(job.spec).steady
            job.measured = None
        failure = Path(job.job_dir) / FAILURE
        if failure.exists():  # kept for the record, but no longer this run's reason
            failure.replace(failure.with_name(f"failure.{int(time.time())}.json"))
        was = job.reason
        job.state, job.reason, job.control, job.pause_reason = JobState.QUEUED, "", Control.RUN, ""
        job.queued_at, job.finished, job.attempts = time.time(), None, 0
        self.event(job, "retry", {"previous": was, "budget": job.spec.get("budget")})
        self._watch_time(job)
        self.wake()
        self._persist(job)
        return job

    # ------------------------------------------------------------------ worker-facing
    def worker_event(self, job: Job, kind: str, data: dict) -> dict:
        """Apply a worker's event; ValueError (nothing changed) when a field is malformed."""
        data = checked_event(kind, data)
        now = time.time()
        job.heartbeat = now
        if kind == Event.START:
            job.steps_total = int(data.get("steps_total", job.steps_total))
            job.step = int(data.get("resumed_from", job.step) or 0)
        elif kind == Event.STEP:
            job.step = int(data.get("step", job.step)) + 1  # the index of the step finished: a count now
            job.loss = data.get("loss")
            job.steps_per_s = data.get("steps_per_s")
        self._worker_says(job, data, now)
        self.event(job, kind, data)
        if kind != Event.STEP:  # steps are saved with the next memory sample (see `sample`)
            self.save(job)
        return {"control": job.control}

    def heartbeat(self, job: Job, body: Any = None) -> dict:
        """A worker's heartbeat: it is alive, and in the phase it states (ValueError when malformed)."""
        now = time.time()
        job.heartbeat = now
        if isinstance(body, dict) and body:
            self._worker_says(job, checked_fields(body), now)
        return {"control": job.control, "heartbeat_s": self.cfg.heartbeat_s}

    def _worker_says(self, job: Job, data: dict, now: float) -> None:
        """The phase the worker states (edgezo.protocol.PhaseTracker); an older statement that arrives
        late (a heartbeat overtaking an event) is ignored."""
        phase, seq = data.get("worker_phase"), data.get("phase_seq")
        if phase is None or seq is None or seq <= self._phase_seq.get(job.id, -1):
            return
        self._phase_seq[job.id] = seq
        self._worker_phase[job.id] = phase
        self._enter_phase(job, phase, now)

    def lease_request(self, job: Job, phase: str, nbytes: int) -> Lease:
        now = time.time()
        job.heartbeat = now
        if job.control == Control.STOP:  # never granted: the worker sees control=stop in the answer and stops
            return Lease(0, job.id, phase, int(nbytes), now, now)
        lease = self.leases.request(job.id, phase, nbytes, now)
        if lease.granted is None and not self.stopping:
            self.scheduler.grant(now)
        if lease.granted is not None and job.phase != phase:
            self._enter_phase(job, phase, now)
            self.event(job, "lease", {"phase": phase, "bytes": lease.nbytes, "waited_s": lease.granted - lease.requested})
        return lease

    def lease_release(self, job: Job, phase: str) -> Lease | None:
        lease = self.leases.release(job.id, phase)
        if lease is not None and job.phase == phase:  # granted, never used: back to what the worker last said
            self._enter_phase(job, self._worker_phase.get(job.id, job.phase), time.time())
        self.wake()
        return lease

    def _enter_phase(self, job: Job, phase: str, now: float) -> None:
        """Switch a job's phase; a phase that ends before the sampler ever saw it gets one sample
        now, so every phase a job went through shows in its memory report, however short."""
        if phase != job.phase and job.pid and job.phase and job.phase not in self._sampled.get(job.id, ()):
            self.sample(now)
        job.phase = phase

    # ------------------------------------------------------------------ the loop
    def sample(self, now: float) -> None:
        pids = {j.id: j.pid for j in self.running() if j.pid}
        self.device = self.monitor.sample(now, pids)
        leased = self.leases.outstanding(self.usage)
        rows = []
        for job in self.running():
            used = self.device.jobs.get(job.id, 0)
            job.mem_now = used
            job.mem_peak = max(job.mem_peak, used)
            if used and job.phase == Phase.ZO_STEP and job.step >= 1 and not self.leases.of_job(job.id):
                job.measured = max(job.measured or 0, used)  # the estimate, refined by measurement
            if job.pid:
                rows.append((job.id, now, used, job.phase or Phase.LOAD))
                self._sampled.setdefault(job.id, set()).add(job.phase or Phase.LOAD)
                self.accounts.add(job.id, now, used)
            self.save(job)
        if self.store:
            try:
                self.store.add_samples(rows, (now, self.device.usage, self.device.edgezo, leased,
                                              self.device.free, self.budget))
            except DiskFull as e:  # the samples are lost; admission, leases and the running jobs go on
                self._disk_full(e)

    def usage(self, job_id: str) -> int:
        return self.device.jobs.get(job_id, 0) if self.device else 0

    def tick(self, now: float) -> None:
        self.ticks += 1
        if self._unsaved:
            self._save_unsaved()
        if self.device is None:
            return
        self.scheduler.decide(now)
        status = self._status_line()
        if status != self._last_status:
            sdnotify.notify(f"STATUS={status}")
            self._last_status = status

    def fail(self, job: Job, reason: str) -> None:
        """Stop a running job at a step boundary and mark it failed with `reason`."""
        log.warning("job %s: failing: %s", job.id, reason)
        self.failing[job.id] = reason
        self.scheduler.over_own_since.pop(job.id, None)
        job.control, job.reason = Control.STOP, f"failing: {reason}"
        self.event(job, "fail", {"reason": reason})
        self.save(job)
        self.workers.escalate_later(job.id)

    def pause(self, job: Job, why: str) -> None:
        job.control = Control.PAUSE
        job.pause_reason = why
        self.event(job, "pause", {"reason": why})
        self.save(job)

    # ------------------------------------------------------------------ workers
    def start(self, job: Job, now: float) -> None:
        resumed = job.state == JobState.PAUSED
        job.state, job.control, job.reason, job.phase = JobState.RUNNING, Control.RUN, "", Phase.LOAD
        job.pause_reason = ""
        job.started, job.heartbeat = now, now
        job.attempts += 1
        self._phase_seq.pop(job.id, None)  # a new worker counts its statements from 0
        self._worker_phase.pop(job.id, None)
        self.event(job, "admitted", {"need_bytes": self.scheduler.steady(job), "resume": resumed,
                                      "headroom_bytes": self.scheduler.headroom()})
        self.save(job)
        self.workers.spawn(job)

    def _worker_started(self, job: Job, pid: int) -> None:
        job.pid = pid
        self.save(job)

    def _finish(self, job: Job, rc: int | None, error: str | None) -> None:
        now = time.time()
        self.leases.drop_job(job.id)
        job.pid, job.heartbeat = None, None
        job_dir = Path(job.job_dir)
        failure = read_json(job_dir / FAILURE)
        report = read_json(job_dir / REPORT) if rc == Exit.DONE else None
        if rc == Exit.DONE:
            job.state, job.reason = JobState.DONE, ""
            if report:
                job.step = int(report.get("steps_done", job.step))
        elif job.id in self.failing:
            job.state, job.reason = JobState.FAILED, self.failing.pop(job.id)
        elif job.control == Control.STOP and rc in (Exit.CANCELLED, Exit.PAUSED) or (job.control == Control.STOP and rc and rc < 0):
            job.state, job.reason = JobState.CANCELLED, str(JobState.CANCELLED)
        elif rc == Exit.CANCELLED:
            job.state, job.reason = JobState.CANCELLED, "cancelled by the worker"
        elif rc == Exit.PAUSED:
            job.state = JobState.PAUSED
            job.reason = job.pause_reason or str(JobState.PAUSED)
            job.queued_at = now
        elif rc == Exit.DISK_FULL:  # every step it finished is in its seed-log; it resumes when there is room
            job.state, job.queued_at = JobState.PAUSED, now
            job.reason = (f"paused: the disk under {job_dir} filled up "
                          f"({(failure or {}).get('reason', 'no space left')}); resumes when "
                          f"{mem.fmt_bytes(self.cfg.disk_reserve)} is free")
        else:
            if error:
                reason = error
            elif failure and failure.get("reason"):
                reason = str(failure["reason"])
            elif rc is not None and rc < 0:
                reason = f"killed by signal {-rc} ({signal.Signals(-rc).name})" if -rc in signal.valid_signals() \
                    else f"killed by signal {-rc}"
            else:
                reason = f"worker exited with code {rc} (see `edgezo logs {job.id}`)"
            retry = rc is not None and rc < 0 and job.attempts <= self.cfg.retries and not self.stopping
            if retry:
                job.state, job.queued_at = JobState.PAUSED, now
                job.reason = f"restarting after: {reason} (attempt {job.attempts + 1} of {self.cfg.retries + 1})"
            else:
                job.state, job.reason = JobState.FAILED, reason
        if self.stopping and job.state == JobState.PAUSED:
            job.reason = "daemon stopped; resumes when it starts again"
        if job.state in FINAL:
            job.finished = now
            self.timers.forget(job.id)
            self.disk.forget(job.id)
        job.control, job.phase = Control.RUN, ""
        self.event(job, "exit", {"code": rc, "state": job.state, "reason": job.reason,
                                  "failure": failure or None})
        self.save(job)
        log.info("job %s: worker exited %s -> %s %s", job.id, rc, job.state, job.reason)
        self.wake()

    # ------------------------------------------------------------------ views
    def _status_line(self) -> str:
        states = [j.state for j in self.jobs.values()]
        dev = self.device
        used = mem.fmt_bytes(dev.usage) if dev else "?"
        return (f"{states.count('running')} running, {states.count('queued') + states.count('paused')} waiting; "
                f"{used} of {mem.fmt_bytes(self.budget)} budget")

    def job_view(self, job: Job) -> dict[str, Any]:
        d = job.public()
        d.pop("spec")
        now = time.time()
        d["need_bytes"] = self.scheduler.steady(job)
        d["leases"] = [lease.public(now) for lease in self.leases.of_job(job.id)]
        d["method"] = job.spec.get("method")
        d["model"] = job.spec.get("model")
        if job.state == JobState.RUNNING and job.control != Control.RUN:
            d["reason"] = job.pause_reason if job.control == Control.PAUSE else job.reason
        if job.state == JobState.RUNNING and job.pid is None:
            d["phase"] = Phase.STARTING
        peak, avg = self.accounts.running(job.id)
        d["mem_avg"] = avg
        d["mem_peak"] = max(job.mem_peak, peak)
        return d

    def memory(self, job: Job) -> dict[str, Any]:
        """The daemon's memory report for a job: every stored sample, by phase (the report's figures)."""
        assert self.store is not None
        return self.accounts.summary(job.id, f"daemon:{self.device.source if self.device else 'unknown'}")

    def device_view(self) -> dict[str, Any]:
        dev = self.device
        assert dev is not None
        now = time.time()
        return {
            "source": dev.source,
            "name": dev.name,
            "total_bytes": dev.total,
            "used_bytes": dev.used,
            "free_bytes": dev.free,
            "budget_bytes": self.budget,
            "reserve_bytes": self.cfg.reserve,
            "usage_bytes": dev.usage,
            "edgezo_bytes": dev.edgezo,
            "external_bytes": dev.external,
            "pending_bytes": self.scheduler.pending(),
            "headroom_bytes": self.scheduler.headroom(),
            "budget_applies_to": "sum of edgezo workers' RSS" if dev.source == "system" else "device used memory",
            "sampled_at": dev.ts,
            "leases_enabled": self.cfg.leases,
            "lease_policy": self.cfg.lease_policy,
            "running": [{"job": j.id, "bytes": self.usage(j.id), "phase": j.phase} for j in self.running()],
            "leases": [lease.public(now) for lease in self.leases.leases.values()],
        }

    def authorize(self, peer) -> bool:
        """May this peer change anything (enqueue, cancel, retry)?"""
        return access.may_change(peer, self.group_gid)
