"""Helpers for the daemon tests: a real daemon subprocess on a temp socket and state dir.

No tests here. Every daemon started through `DaemonProc` is killed at teardown, with every
process still running from its state directory (workers), so no test leaves processes behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from edgezo.client import Client

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (tests/ engines such as tests.phase_probe)
SYNTHETIC = "step_s=0.05,heavy_every=4,heavy_bytes=64MiB,heavy_s=0.3"


def wait_for(pred, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class DaemonProc:
    def __init__(self, state_dir: Path | None = None, *args: str, env: dict | None = None,
                 engine: str | None = "synthetic", synthetic: str = SYNTHETIC, budget: str = "2GiB"):
        self.tmp = Path(tempfile.mkdtemp(prefix="ezd", dir="/tmp"))  # short: AF_UNIX paths max 107 bytes
        self.state_dir = Path(state_dir) if state_dir else self.tmp / "state"
        self.socket = self.tmp / "edgezo.sock"
        self.args = list(args)
        self.engine, self.budget = engine, budget
        self.env = dict(os.environ)
        self.env.update({"EDGEZO_SYNTHETIC": synthetic, "EDGEZO_HEARTBEAT_S": "0.5", "EDGEZO_LOG": "WARNING"})
        self.env.pop("NOTIFY_SOCKET", None)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        if env:
            self.env.update(env)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.tmp / "daemon.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "edgezo.daemon_cli", "daemon", "--state-dir", str(self.state_dir),
               "--socket", str(self.socket), "--budget", self.budget, "--sample-interval", "0.1",
               "--heartbeat", "0.5", "--lease-ttl", "5", "--stop-timeout", "10"]
        if self.engine:
            cmd += ["--engine", self.engine]
        return cmd + self.args

    def start(self, wait: bool = True, **popen) -> DaemonProc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(self.tmp), start_new_session=True, **popen)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def up():
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                return self.client().health()["ok"]
            except Exception:
                return False

        wait_for(up, timeout, what="daemon ready")

    def client(self) -> Client:
        return Client(self.socket, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, timeout: float = 30, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edgezo.daemon_cli", *args, "--socket", str(self.socket)],
                              capture_output=True, text=True, env=self.env, timeout=timeout, cwd=cwd)

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--unix-socket", str(self.socket), *args],
                              capture_output=True, text=True, timeout=30)

    def enqueue(self, spec: dict, **kw) -> dict:
        return self.client().enqueue(spec, **kw)

    def job(self, job_id: str) -> dict:
        return self.client().job(job_id)

    def wait_state(self, job_id: str, states, timeout: float = 60.0) -> dict:
        states = (states,) if isinstance(states, str) else tuple(states)
        return wait_for(lambda: (j := self.job(job_id))["state"] in states and j, timeout,
                        what=f"{job_id} in {states}")

    def events(self, job_id: str) -> list[dict]:
        return self.client().events(job_id)

    def workers(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info.get("cmdline") or []
            if "edgezo.worker" in cmd and any(str(self.state_dir) in c for c in cmd):
                out.append(p)
        return out

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else None

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for p in self.workers():
            try:
                p.kill()
                p.wait(5)
            except psutil.Error:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def synthetic_spec(name: str, steps: int = 24, **extra) -> dict:
    spec = {"name": name, "steps": steps, "model": "default"}
    spec.update(extra)
    return spec


def report_of(d: DaemonProc, job_id: str) -> dict:
    return json.loads(json.dumps(d.client().report(job_id)))


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, without importing torch."""


def cuda_oom_engine(job_dir, hooks):
    """A worker engine that fails the way a CUDA OOM does, after a first step."""
    hooks.on_event("start", {"steps_total": 10, "resumed_from": 0})
    hooks.on_event("step", {"step": 0, "loss": 1.0, "steps_per_s": 1.0, "lr": 0.0})
    raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.6 GiB total capacity)")
