"""Worker processes: spawn one per running job, stop it with escalation, reap it, and deal with the
workers a dead daemon left behind.

What a worker's exit *means* (done, paused, failed and why) is the daemon's business (`on_exit`);
this module only runs processes. The clock and the process calls are the ones asyncio and os give.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from edgezo.jobdir import FAILURE, WORKER_LOG

from .store import Job

log = logging.getLogger("edgezo.daemon")

_ENV_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def _pdeathsig() -> None:
    """In the worker before exec: get SIGTERM if the daemon dies (it then checkpoints and exits)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def is_worker(pid: int, job_id: str) -> bool:
    """Is `pid` still a worker of `job_id` (and not a reused pid)?"""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"edgezo.worker" in cmd and job_id.encode() in cmd


def reap_orphan(pid: int, wait_s: float = 15.0) -> None:
    """A worker of the dead daemon (pdeathsig already asked it to checkpoint): let it finish, then kill."""
    deadline = time.time() + wait_s
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Supervisor:
    """The running workers, by job id. `on_started(job, pid)` and `on_exit(job, rc, error)` tell the
    daemon; rc is None (and error says why) when the worker could not be started at all. `cfg` is the
    daemon's Config (socket_path, heartbeat_s, engine, cancel_grace_s), read when used."""

    def __init__(self, cfg: Any, on_started: Callable[[Job, int], None],
                 on_exit: Callable[[Job, int | None, str | None], None]):
        self.cfg = cfg
        self.on_started, self.on_exit = on_started, on_exit
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.tasks: set[asyncio.Task] = set()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _ENV_NOT_INHERITED}
        env.update({"EDGEZO_HEARTBEAT_S": str(self.cfg.heartbeat_s), "EDGEZO_SOCKET": str(self.cfg.socket_path),
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
        # glibc keeps a heavy phase's freed heap pages; the trainer hands them back at the end of each
        # phase (edgezo.memory.release_free_heap), so a worker's RSS comes back down without the cost
        # of MALLOC_MMAP_THRESHOLD_ (1.5x the fzoo default job's step time on 2 CPU cores).
        if self.cfg.engine:
            env["EDGEZO_ENGINE"] = self.cfg.engine
        return env

    def spawn(self, job: Job) -> None:
        self.background(self._run(job))

    async def _run(self, job: Job) -> None:
        job_dir = Path(job.job_dir)
        with contextlib.suppress(FileNotFoundError):
            (job_dir / FAILURE).unlink()
        cmd = [sys.executable, "-m", "edgezo.worker", str(job_dir), "--socket", str(self.cfg.socket_path),
               "--job-id", job.id]
        with open(job_dir / WORKER_LOG, "ab") as logf:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                    env=self.env(), cwd=str(job_dir), start_new_session=True, preexec_fn=_pdeathsig,
                )
            except OSError as e:
                self.on_exit(job, None, f"could not start the worker: {e}")
                return
        self.procs[job.id] = proc
        self.on_started(job, proc.pid)
        rc = await proc.wait()
        self.procs.pop(job.id, None)
        self.on_exit(job, rc, None)

    def escalate_later(self, job_id: str) -> None:
        """The worker now running `job_id` was told to stop: terminate it after the grace, then kill it."""
        self.background(self._escalate(job_id, self.procs.get(job_id)))

    async def _escalate(self, job_id: str, proc: asyncio.subprocess.Process | None) -> None:
        """Only that worker: if the job was retried meanwhile, its new worker is left alone."""
        await asyncio.sleep(self.cfg.cancel_grace_s)
        if proc is None or self.procs.get(job_id) is not proc:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await asyncio.sleep(5)
        if self.procs.get(job_id) is proc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def wait_all(self, timeout_s: float) -> None:
        """Wait for every worker to exit (they were asked to checkpoint); kill those that do not."""
        deadline = time.time() + timeout_s
        while self.procs and time.time() < deadline:
            await asyncio.sleep(0.1)
        for job_id, proc in list(self.procs.items()):
            log.warning("worker of %s did not stop in time: killing it", job_id)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        end = time.time() + 5
        while self.procs and time.time() < end:
            await asyncio.sleep(0.05)

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
