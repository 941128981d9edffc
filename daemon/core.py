"""The daemon: one asyncio loop that samples memory, admits jobs, grants leases and supervises workers.

Shaped like ollama's scheduler: every decision happens in `tick()`, in a fixed order, from one
snapshot of the device:

    sample -> expire leases -> enforce windows -> relieve pressure -> admit -> grant leases

The decisions themselves are pure functions in `policies/`; this module only gathers their inputs
and carries out their answers (spawning, pausing, killing workers). It never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgezo.jobdir import FAILURE, JOB_RECORD, REPORT, SPEC, read_json, write_json_atomic
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
from edgezo.timeweighted import Accumulator
from policies import admission
from policies import leases as lease_policy
from policies import memory as mem

from . import access, jobrecord, sdnotify, windows
from .diskroom import DiskRoom, free_disk
from .leases import Lease, LeaseBroker
from .monitor import DeviceState, Monitor
from .store import DiskFull, Job, Store, StoreCorrupt, find_job
from .store import is_disk_full as store_is_disk_full
from .supervisor import Supervisor, is_worker, reap_orphan

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


_JOB_SEQ = re.compile(r"-([0-9]{1,12})$")  # job ids are {name}-{seq}
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
        self.over_since: float | None = None
        self.blocked_since: float | None = None  # when the leases last became stuck (see _unblock_leases)
        self.failing: dict[str, str] = {}  # job -> why the daemon is stopping it as failed
        self.over_own_since: dict[str, float] = {}  # job -> since when it is over its own budget
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
        self._seq_floor = 0  # the highest job number any job directory carries (see _adopt_orphans)
        self._acc: dict[str, Accumulator] = {}  # job -> its samples' peak and time-weighted average
        self._unsaved: set[str] = set()  # jobs whose last change a full disk kept out of the store
        self._recorded: dict[str, tuple] = {}  # job -> what its job.json last recorded (see _save)
        self.disk_full_writes = 0  # store writes a full disk refused (events and samples are dropped)
        self._disk_full_logged = 0.0
        self.disk = DiskRoom(self.jobs_dir, self._running)
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
        self._restore_from_job_files()
        self._adopt_orphans()
        self._recover()

    def _restore_from_job_files(self) -> None:
        """Each job directory's job.json is the daemon's second record of the job. Where it is newer
        than the store (a damaged WAL frame makes SQLite drop that commit and every later one, without
        a word: an acknowledged cancel came back undone), it wins, and the store is corrected."""
        for job in list(self.jobs.values()):
            newer = jobrecord.read(Path(job.job_dir))
            if newer is None or not isinstance(newer.version, int) or newer.version <= job.version:
                self._recorded[job.id] = jobrecord.decisive(job)
                continue
            if newer.id != job.id:
                continue
            log.warning("job %s: the store had version %d (%s), its job directory version %d (%s); the store lost "
                        "a change and is corrected from %s", job.id, job.version, job.state, newer.version,
                        newer.state, JOB_RECORD)
            self.jobs[job.id] = newer
            self._save(newer)
            self._event(newer, "restored", {"from": JOB_RECORD, "store_version": job.version,
                                            "version": newer.version})

    def _adopt_orphans(self) -> None:
        """Job directories the store does not know (a lost or rolled-back database) come back as jobs:
        as their job.json recorded them, or, without one, done when their report says so, otherwise
        failed with a reason (never run by surprise). Their ids are never handed out again (a new job
        once picked up an old job's seed-log)."""
        for d in sorted(self.jobs_dir.iterdir()):
            m = _JOB_SEQ.search(d.name)
            if m:
                self._seq_floor = max(self._seq_floor, int(m.group(1)))
            if d.name in self.jobs or not m or not (d / SPEC).is_file():
                continue
            recorded = jobrecord.read(d)
            if recorded is not None and recorded.id == d.name:  # the daemon's own record: exactly as acknowledged
                self.jobs[recorded.id] = recorded
                self._save(recorded)
                self._event(recorded, "restored", {"from": JOB_RECORD, "store_version": None,
                                                   "version": recorded.version})
                log.warning("job %s was missing from the store; restored from %s as %s", d.name, JOB_RECORD,
                            recorded.state)
                continue
            try:
                spec = json.loads((d / SPEC).read_text())
                report = json.loads((d / REPORT).read_text()) if (d / REPORT).is_file() else {}
            except (OSError, ValueError) as e:
                log.warning("job directory %s is not in the store and unreadable (%s); left alone", d, e)
                continue
            done = report.get("status") == JobState.DONE
            job = Job(id=d.name, seq=int(m.group(1)), name=str(spec.get("name", d.name)), spec=spec, job_dir=str(d),
                      created=d.stat().st_mtime, state=JobState.DONE if done else JobState.FAILED,
                      steps_total=int(spec.get("steps", 0) or 0), step=int(report.get("steps_done", 0) or 0),
                      reason="" if done else "adopted from its job directory after the store lost it; "
                      "`edgezo retry` resumes it from its seed-log")
            self.jobs[job.id] = job
            self._save(job)
            self._event(job, "adopted", {"job_dir": str(d), "report": bool(report)})
            log.warning("job %s was missing from the store; adopted from %s as %s", job.id, d, job.state)

    def _recover(self) -> None:
        """Jobs that were running when the previous daemon died resume from their seed-logs."""
        now = time.time()
        for job in self.jobs.values():
            if job.state != JobState.RUNNING:
                continue
            if job.pid and is_worker(job.pid, job.id):
                reap_orphan(job.pid)
            job.state, job.pid, job.control, job.phase = JobState.PAUSED, None, Control.RUN, ""
            job.reason = "resuming after daemon restart (from its seed-log)"
            job.queued_at = now
            job.heartbeat = None
            self._event(job, "recovered", {"step": job.step})
            self._save(job)

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
        for job in self._running():
            job.control = Control.PAUSE
            job.pause_reason = "daemon stopped; resumes when it starts again"
            self._save(job)
        await self.workers.wait_all(self.cfg.stop_timeout_s)

    # ------------------------------------------------------------------ jobs
    def _running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.state == JobState.RUNNING]

    def _save(self, job: Job) -> None:
        """Write a job through to the store. On a full disk the change stays in memory (it is in
        effect) and is written again each tick until there is room; see `_persist` for changes a
        client waits to have acknowledged."""
        if not self.store:
            return
        decisive = jobrecord.decisive(job)
        if self._recorded.get(job.id) != decisive:  # state, control or allotment changed: record it twice
            job.version += 1
            self._recorded[job.id] = decisive
            jobrecord.write(job)
        try:
            self.store.save_job(job)
            self._unsaved.discard(job.id)
        except DiskFull as e:
            self._unsaved.add(job.id)
            self._disk_full(e)

    def _persist(self, job: Job) -> None:
        """`_save` for a change a client asked for: a full disk is the client's answer (HTTP 507)."""
        self._save(job)
        if job.id in self._unsaved:
            raise DiskFull(f"the disk under {self.state_dir} is full: the change to {job.id} is in effect but not "
                           "saved yet (it is saved once there is room; a daemon restart before that would lose it)")

    def _save_unsaved(self) -> None:
        for job_id in list(self._unsaved):
            if job_id in self.jobs:
                self._save(self.jobs[job_id])
            else:
                self._unsaved.discard(job_id)

    def _event(self, job: Job, kind: str, data: dict) -> None:
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
            job.version, self._recorded[job.id] = 1, jobrecord.decisive(job)
            jobrecord.write(job)
            self.store.save_job(job)
        except (OSError, DiskFull) as e:
            shutil.rmtree(job_dir, ignore_errors=True)
            if isinstance(e, DiskFull) or store_is_disk_full(e):
                raise DiskFull(f"the disk under {self.state_dir} is full: the job was not queued "
                               f"({mem.fmt_bytes(free_disk(self.jobs_dir))} free)") from e
            raise
        self.jobs[job.id] = job
        self._event(job, "enqueued", {"estimate_bytes": job.estimate, "window": window, "not_before": job.not_before})
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
        self._event(job, "cancel", {"state": job.state})
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

    def _wait_for_disk(self, job: Job) -> bool:
        """True (and the job's reason says why, with the numbers) when what it has still to write does
        not fit the free disk, less what running jobs have still to write."""
        waiting = self.disk.wait_reason(job)
        if waiting and job.reason != f"waiting: {waiting[0]}":
            job.reason = f"waiting: {waiting[0]}"
            self._event(job, "disk-wait", {"reason": job.reason, "need_bytes": waiting[1], "free_bytes": waiting[2]})
            self._save(job)
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
        self._event(job, "retry", {"previous": was, "budget": job.spec.get("budget")})
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
        self._event(job, kind, data)
        if kind != Event.STEP:  # steps are saved with the next memory sample (see `sample`)
            self._save(job)
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
            self._grant(now)
        if lease.granted is not None and job.phase != phase:
            self._enter_phase(job, phase, now)
            self._event(job, "lease", {"phase": phase, "bytes": lease.nbytes, "waited_s": lease.granted - lease.requested})
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
        pids = {j.id: j.pid for j in self._running() if j.pid}
        self.device = self.monitor.sample(now, pids)
        leased = self.leases.outstanding(self._usage)
        rows = []
        for job in self._running():
            used = self.device.jobs.get(job.id, 0)
            job.mem_now = used
            job.mem_peak = max(job.mem_peak, used)
            if used and job.phase == Phase.ZO_STEP and job.step >= 1 and not self.leases.of_job(job.id):
                job.measured = max(job.measured or 0, used)  # the estimate, refined by measurement
            if job.pid:
                rows.append((job.id, now, used, job.phase or Phase.LOAD))
                self._sampled.setdefault(job.id, set()).add(job.phase or Phase.LOAD)
                self._accumulate(job.id, now, used)
            self._save(job)
        if self.store:
            try:
                self.store.add_samples(rows, (now, self.device.usage, self.device.edgezo, leased,
                                              self.device.free, self.budget))
            except DiskFull as e:  # the samples are lost; admission, leases and the running jobs go on
                self._disk_full(e)

    def _usage(self, job_id: str) -> int:
        return self.device.jobs.get(job_id, 0) if self.device else 0

    def _steady(self, job: Job) -> int:
        """What admission reserves for a job: a declared `budget` is an allotment the job may grow
        into (kept even when it measures less); a model-based estimate yields to measurement."""
        if job.spec.get("budget"):
            return max(int(job.spec["budget"]), job.measured or 0)
        return mem.refine(job.estimate, job.measured)

    def pending(self) -> int:
        """Memory promised but not yet visible in measurements: starting workers and fresh leases.

        A running job is counted at its steady (ZO-step) footprint, since it may climb back there,
        unless it is idle: every step done and waiting for a lease (its last projection or the final
        eval). It sleeps until granted, so it holds what it holds now, and the lease covers the rest.
        Counting idle jobs at their step peaks made jobs queued at the end look like a deadlock."""
        unmeasured = sum(max(self._steady(j) - self._usage(j.id), 0) for j in self._running() if not self._idle(j))
        return unmeasured + self.leases.outstanding(self._usage)

    def _idle(self, job: Job) -> bool:
        return (bool(job.steps_total) and job.step >= job.steps_total and self._usage(job.id) > 0
                and any(x.granted is None for x in self.leases.of_job(job.id)))

    def headroom(self) -> int:
        dev = self.device
        assert dev is not None
        pend = self.pending()
        return admission.headroom(self.budget, dev.usage + pend, dev.free - pend, self.cfg.reserve)

    def tick(self, now: float) -> None:
        self.ticks += 1
        if self._unsaved:
            self._save_unsaved()
        if self.device is None:
            return
        for lease in self.leases.expire(now, self._heartbeat_of):
            log.warning("lease %s of %s expired (worker stopped heartbeating)", lease.phase, lease.job_id)
            job = self.jobs.get(lease.job_id)
            if job:
                self._event(job, "lease-expired", {"phase": lease.phase, "bytes": lease.nbytes})
        if not self.stopping:
            self._enforce_windows(now)
            self._relieve_pressure(now)
            self._enforce_job_budgets(now)
            self._admit(now)
            self._grant(now)
            self._unblock_leases(now)
        status = self._status_line()
        if status != self._last_status:
            sdnotify.notify(f"STATUS={status}")
            self._last_status = status

    def _unblock_leases(self, now: float) -> None:
        """Break a lease deadlock that has lasted `lease_max_wait_s` (policies.leases.unblock decides)."""
        running, pending = self._running(), self.leases.waiting()
        if not pending or not self.cfg.leases or any(j.control != Control.RUN for j in running):
            self.blocked_since = None  # nothing waits, or someone is already pausing or stopping
            return
        waiting = [lease_policy.Request(x.key, x.job_id, x.phase, x.nbytes, x.requested) for x in pending]
        holders = [lease_policy.Holder(j.id, j.started or 0.0, self._usage(j.id)) for j in running]
        decision = lease_policy.unblock(holders, waiting, granted=len(self.leases.granted()),
                                        headroom=self.headroom(), budget=self.budget, fmt=mem.fmt_bytes)
        if decision is None:
            self.blocked_since = None
            return
        if self.blocked_since is None:
            self.blocked_since = now
        if now - self.blocked_since < self.cfg.lease_max_wait_s:
            return
        job = self.jobs[decision.job_id]
        log.warning("job %s: %s (%s)", job.id, decision.action, decision.reason)
        if decision.action == "pause":
            self._pause(job, decision.reason)
        else:
            self._fail(job, decision.reason)
        self.blocked_since = None

    def _heartbeat_of(self, job_id: str) -> float | None:
        job = self.jobs.get(job_id)
        if job is None or job.state != JobState.RUNNING:
            return None
        return job.heartbeat

    def _enforce_windows(self, now: float) -> None:
        dt = datetime.fromtimestamp(now, timezone.utc)
        for job in self._running():
            if job.window and job.control == Control.RUN and not windows.in_window(job.window, dt):
                self._pause(job, f"outside its window '{job.window}'")

    def _relieve_pressure(self, now: float) -> None:
        dev = self.device
        assert dev is not None
        over = max(dev.usage - self.budget, self.cfg.reserve - dev.free if dev.free < self.cfg.reserve else 0)
        if over <= 0:
            self.over_since = None
            return
        if self.over_since is None:
            self.over_since = now
        if now - self.over_since < self.cfg.pressure_grace_s:
            return
        if any(j.control == Control.PAUSE for j in self._running()):
            return  # one at a time: wait for that one to checkpoint and free its memory
        victims = [(j.id, j.started or 0.0) for j in self._running() if j.control == Control.RUN]
        victim = admission.pressure_victim(victims, over)
        if victim:
            self._pause(self.jobs[victim], f"memory pressure: {mem.fmt_bytes(dev.usage)} used, "
                                           f"budget {mem.fmt_bytes(self.budget)}, {mem.fmt_bytes(dev.free)} free")
            self.over_since = now

    def _enforce_job_budgets(self, now: float) -> None:
        """A job's own `budget:` caps its steady footprint (ZO steps; loading is transient and leased
        heavy phases are the device budget's business). Over it for `--pressure-grace` seconds, the
        job fails (pausing would only readmit it into the same overrun), saying how to resume it."""
        for job in self._running():
            cap = job.spec.get("budget")
            used = self._usage(job.id)
            leased = any(x.granted is not None for x in self.leases.of_job(job.id))
            steady = job.phase == Phase.ZO_STEP and not leased  # not loading, evaluating or projecting
            if not cap or job.control != Control.RUN or not steady or used <= int(cap):
                self.over_own_since.pop(job.id, None)
                continue
            since = self.over_own_since.setdefault(job.id, now)
            if now - since >= self.cfg.pressure_grace_s:
                self._fail(job, admission.over_own_budget(used, int(cap), now - since, job.id))

    def _fail(self, job: Job, reason: str) -> None:
        """Stop a running job at a step boundary and mark it failed with `reason`."""
        log.warning("job %s: failing: %s", job.id, reason)
        self.failing[job.id] = reason
        self.over_own_since.pop(job.id, None)
        job.control, job.reason = Control.STOP, f"failing: {reason}"
        self._event(job, "fail", {"reason": reason})
        self._save(job)
        self.workers.escalate_later(job.id)

    def _pause(self, job: Job, why: str) -> None:
        job.control = Control.PAUSE
        job.pause_reason = why
        self._event(job, "pause", {"reason": why})
        self._save(job)

    def _admit(self, now: float) -> None:
        dt = datetime.fromtimestamp(now, timezone.utc)
        candidates = []
        for job in self.jobs.values():
            if job.state not in (JobState.QUEUED, JobState.PAUSED):
                continue
            if job.not_before and now < job.not_before:
                job.reason = f"waiting: starts at {datetime.fromtimestamp(job.not_before).isoformat(timespec='minutes')}"
                continue
            if job.window and not windows.in_window(job.window, dt):
                opening, _ = windows.window_edges(job.window, dt)
                when = f" (opens {opening.isoformat(timespec='minutes')})" if opening else ""
                job.reason = f"waiting: outside its window '{job.window}'{when}"
                continue
            if self._wait_for_disk(job):  # before memory: a job that cannot start takes no one's room
                continue
            candidates.append(admission.Candidate(job.id, self._steady(job), job.queued_at, job.state == JobState.PAUSED))
        if not candidates:
            return
        free = free_disk(self.jobs_dir)
        if free < self.cfg.disk_reserve:  # a worker would fail on its first seed-log write
            reason = (f"waiting for disk space: {mem.fmt_bytes(free)} free under {self.jobs_dir}, a job starts with "
                      f"at least {mem.fmt_bytes(self.cfg.disk_reserve)} free")
            for c in candidates:
                job = self.jobs[c.job_id]
                if job.reason != reason:
                    job.reason = reason
                    self._save(job)
            return
        dev = self.device
        assert dev is not None
        pend = self.pending() + sum(x.nbytes for x in self.leases.waiting())  # running jobs' heavy phases first
        decisions = admission.admit(
            candidates,
            budget=self.budget,
            committed=dev.usage + pend,
            device_free=dev.free - pend,
            now=now,
            reserve=self.cfg.reserve,
            max_wait_s=self.cfg.admit_max_wait_s,
            max_jobs=self.cfg.max_jobs,
            running=len(self._running()),
        )
        for d in decisions:
            job = self.jobs[d.job_id]
            if d.start and not self._wait_for_disk(job):  # again: the jobs started just now write too
                self._start(job, now)
            elif job.reason != d.reason:
                job.reason = d.reason
                self._save(job)

    def _grant(self, now: float) -> None:
        if self.device is None:
            return
        for lease in self.leases.grant(self.headroom(), now, self._usage):
            job = self.jobs.get(lease.job_id)
            if job:
                self._event(job, "lease-granted", {"phase": lease.phase, "bytes": lease.nbytes,
                                                   "waited_s": round(now - lease.requested, 3)})

    # ------------------------------------------------------------------ workers
    def _start(self, job: Job, now: float) -> None:
        resumed = job.state == JobState.PAUSED
        job.state, job.control, job.reason, job.phase = JobState.RUNNING, Control.RUN, "", Phase.LOAD
        job.pause_reason = ""
        job.started, job.heartbeat = now, now
        job.attempts += 1
        self._phase_seq.pop(job.id, None)  # a new worker counts its statements from 0
        self._worker_phase.pop(job.id, None)
        self._event(job, "admitted", {"need_bytes": self._steady(job), "resume": resumed,
                                      "headroom_bytes": self.headroom()})
        self._save(job)
        self.workers.spawn(job)

    def _worker_started(self, job: Job, pid: int) -> None:
        job.pid = pid
        self._save(job)

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
        self._event(job, "exit", {"code": rc, "state": job.state, "reason": job.reason,
                                  "failure": failure or None})
        self._save(job)
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
        d["need_bytes"] = self._steady(job)
        d["leases"] = [lease.public(now) for lease in self.leases.of_job(job.id)]
        d["method"] = job.spec.get("method")
        d["model"] = job.spec.get("model")
        if job.state == JobState.RUNNING and job.control != Control.RUN:
            d["reason"] = job.pause_reason if job.control == Control.PAUSE else job.reason
        if job.state == JobState.RUNNING and job.pid is None:
            d["phase"] = Phase.STARTING
        peak, avg = self._running_summary(job)
        d["mem_avg"] = avg
        d["mem_peak"] = max(job.mem_peak, peak)
        return d

    def _running_summary(self, job: Job) -> tuple[int, int]:
        """(peak, time-weighted avg) kept incrementally, so `status` never rescans the samples; the
        same accumulator over the same samples as the report's `memory_summary`, so the two agree."""
        acc = self._acc.get(job.id)
        if acc is None:
            acc = self._acc[job.id] = Accumulator()
            for ts, nbytes, _ in self.store.samples(job.id) if self.store else []:
                acc.add(ts, nbytes)
        return int(acc.peak), int(round(acc.avg))

    def _accumulate(self, job_id: str, now: float, used: int) -> None:
        if job_id not in self._acc:  # a job from before a restart: start from its history
            self._running_summary(self.jobs[job_id])
        self._acc[job_id].add(now, used)

    def memory(self, job: Job) -> dict[str, Any]:
        from .store import memory_summary

        assert self.store is not None
        summary = memory_summary(self.store.samples(job.id))
        summary["meter"] = f"daemon:{self.device.source if self.device else 'unknown'}"
        return summary

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
            "pending_bytes": self.pending(),
            "headroom_bytes": self.headroom(),
            "budget_applies_to": "sum of edgezo workers' RSS" if dev.source == "system" else "device used memory",
            "sampled_at": dev.ts,
            "leases_enabled": self.cfg.leases,
            "lease_policy": self.cfg.lease_policy,
            "running": [{"job": j.id, "bytes": self._usage(j.id), "phase": j.phase} for j in self._running()],
            "leases": [lease.public(now) for lease in self.leases.leases.values()],
        }

    def authorize(self, peer) -> bool:
        """May this peer change anything (enqueue, cancel, retry)?"""
        return access.may_change(peer, self.group_gid)
