"""A daemon-supervised worker: `python -m edgezo.worker JOB_DIR --socket SOCK --job-id ID`.

Runs one job's engine in its own process and talks to the daemon over the socket API through
`DaemonHooks`: events are posted, leases are asked for (never waited on), a heartbeat thread keeps
leases alive and carries the daemon's control word (run / pause / stop) back.

Exit codes (edgezo.protocol.Exit): 0 done, 3 paused (checkpointed in the seed-log, resumable),
4 cancelled, 1 failed, 5 disk full — and on failure `JOB_DIR/failure.json` {"reason", "type"} says
why (CUDA OOM, data, spec, ...). Every event and heartbeat states the worker's phase
(edgezo.protocol.PhaseTracker).

Engines (env EDGEZO_ENGINE): "trainer" (default, `edgezo.trainer.run_job`), "synthetic" (test
support, edgezo/testing/synthetic.py: no model, for scheduler tests and benchmarks), or
"package.module:function" with run_job's signature.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from edgezo.client import ApiError, Client, DaemonNotRunning
from edgezo.hooks import TrainerHooks
from edgezo.jobdir import FAILURE, write_json_atomic
from edgezo.protocol import Cancelled, Control, EdgezoError, Event, Exit, Paused, PhaseTracker

UNREACHABLE_PAUSE_S = 30.0  # no daemon for this long: checkpoint and stop rather than run unsupervised


class DaemonHooks(TrainerHooks):
    """TrainerHooks over the daemon's socket.

    Events go out on a sender thread, in order, so a slow or stalled daemon never holds up a step (a
    daemon busy with 100 status clients once slowed steps 10x); consecutive step events still waiting
    are merged into the newest, which is all the daemon keeps. Lease calls, which need the answer,
    first wait for the events before them, so the daemon sees everything in the worker's order.
    """

    def __init__(self, job_id: str, socket_path: str | None = None, heartbeat_s: float | None = None,
                 log=sys.stdout):
        self.job_id = job_id
        self.socket_path = socket_path
        self.client = Client(socket_path, timeout=10)
        self.heartbeat_s = heartbeat_s or float(os.environ.get("EDGEZO_HEARTBEAT_S", "2"))
        self.log = log
        self._control: str = Control.RUN
        self.phases = PhaseTracker()
        self._local_pause = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable_since: float | None = None
        self._leases: set[str] = set()
        self.steps_total: int | None = None
        self._outbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._outbox_cv = threading.Condition()
        self._closing = False
        self._sender: threading.Thread | None = None

    # lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="edgezo-heartbeat", daemon=True)
        self._thread.start()
        self._sender = threading.Thread(target=self._send_events, name="edgezo-events", daemon=True)
        self._sender.start()

    def stop(self, flush_s: float = 30.0) -> None:
        """Deliver the events still queued (the last says done, paused or failed), then stop."""
        self._flush(flush_s)
        with self._outbox_cv:
            self._closing = True
            self._outbox_cv.notify_all()
        if self._sender is not None:
            self._sender.join(timeout=2)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.client.close()

    def request_pause(self, *_: Any) -> None:
        """SIGTERM/SIGINT (or the daemon's death via PDEATHSIG): checkpoint at the next step boundary."""
        self._local_pause = True

    # talking to the daemon ---------------------------------------------------------
    def _post(self, method: str, path: str, body: Any = None, client: Client | None = None) -> Any:
        try:
            with self._lock if client is None else contextlib.nullcontext():
                answer = (client or self.client).request(method, path, body)
        except (DaemonNotRunning, OSError, ApiError) as e:
            if self._unreachable_since is None:
                self._unreachable_since = time.monotonic()
                self._say(f"daemon unreachable: {e}")
            return None
        self._unreachable_since = None
        if isinstance(answer, dict) and answer.get("control") in (Control.RUN, Control.PAUSE, Control.STOP):
            self._control = answer["control"]
        return answer

    def _beat(self) -> None:
        client = Client(self.socket_path, timeout=5)
        try:
            while not self._stop.wait(self.heartbeat_s):
                try:  # the heartbeat outlives any one failure: a 7 s daemon stall once ended it for good
                    phase, seq = self.phases.stated
                    self._post("POST", f"/jobs/{self.job_id}/heartbeat",
                               {"pid": os.getpid(), "worker_phase": str(phase), "phase_seq": seq}, client=client)
                except Exception as e:
                    self._say(f"heartbeat failed, retrying: {type(e).__name__}: {e}")
        finally:
            client.close()

    def _send_events(self) -> None:
        client = Client(self.socket_path, timeout=10)
        try:
            while True:
                with self._outbox_cv:
                    while not self._outbox and not self._closing:
                        self._outbox_cv.wait()
                    if not self._outbox:
                        return
                    kind, data = self._outbox[0]
                try:
                    self._post("POST", f"/jobs/{self.job_id}/events", {"kind": kind, "data": data}, client=client)
                except Exception as e:  # the sender, like the heartbeat, outlives any one failure
                    self._say(f"event {kind} not delivered: {type(e).__name__}: {e}")
                with self._outbox_cv:
                    self._outbox.popleft()
                    self._outbox_cv.notify_all()
        finally:
            client.close()

    def _flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued event has been sent (or `timeout`, or there is no sender)."""
        end = time.monotonic() + timeout
        with self._outbox_cv:
            while self._outbox and self._sender is not None and self._sender.is_alive():
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._outbox_cv.wait(left)

    # TrainerHooks --------------------------------------------------------------------
    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        self._say(_describe(kind, data, self))
        item = (kind, _jsonable(self.phases.stamp(kind, data)))
        if self._sender is None:  # not started (tests): deliver inline
            self._post("POST", f"/jobs/{self.job_id}/events", {"kind": kind, "data": item[1]})
            return
        with self._outbox_cv:
            if kind == Event.STEP and len(self._outbox) > 1 and self._outbox[-1][0] == Event.STEP:
                self._outbox[-1] = item  # not yet being sent: the newer step supersedes it
            else:
                self._outbox.append(item)
            self._outbox_cv.notify_all()

    def try_lease(self, phase: str, nbytes: int) -> bool:
        self._flush()
        answer = self._post("POST", "/leases", {"job": self.job_id, "phase": phase, "bytes": int(nbytes)})
        granted = bool(answer and answer.get("granted"))
        if granted and phase not in self._leases:
            self._leases.add(phase)
            self._say(f"lease {phase} {int(nbytes) / 2**20:.1f} MiB granted after {answer.get('waited_s', 0)} s")
        return granted

    def release_lease(self, phase: str) -> None:
        self._leases.discard(phase)
        self._flush()
        self._post("DELETE", f"/leases/{self.job_id}/{phase}")

    def control(self) -> str:
        if self._control == Control.STOP:
            return Control.STOP
        if self._local_pause or self._control == Control.PAUSE:
            return Control.PAUSE
        if self._unreachable_since is not None and time.monotonic() - self._unreachable_since > UNREACHABLE_PAUSE_S:
            return Control.PAUSE
        return Control.RUN

    def _say(self, line: str) -> None:
        if line:
            with contextlib.suppress(OSError):  # a full disk fails the job's writes, not its log lines
                print(f"{time.strftime('%H:%M:%S')} {line}", file=self.log, flush=True)


def _describe(kind: str, data: dict, hooks: DaemonHooks) -> str:
    if kind == Event.START:
        hooks.steps_total = data.get("steps_total")
        return f"start: {data.get('steps_total')} steps, resumed from {data.get('resumed_from', 0)}"
    if kind == Event.STEP:
        rate = data.get("steps_per_s")
        return (f"step {int(data.get('step', 0)) + 1}/{hooks.steps_total or '?'} loss {data.get('loss', float('nan')):.4f}"
                + (f" {rate:.2f} steps/s" if rate else ""))
    if kind == Event.EVAL:
        shown = {k: v for k, v in (data.get("metrics") or {}).items() if k != "correct"}
        return f"eval at step {data.get('step')}: {json.dumps(shown)}"
    if kind == Event.DONE:
        return str(Event.DONE)
    return f"{kind} {json.dumps(_jsonable(data))[:300]}"


def _jsonable(data: Any) -> Any:
    try:
        json.dumps(data)
        return data
    except (TypeError, ValueError):
        return json.loads(json.dumps(data, default=str))


# ------------------------------------------------------------------------------ failures
def disk_full(exc: BaseException | None) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain (safetensors and torch.save wrap it in their own errors)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def classify(exc: BaseException) -> dict[str, str]:
    """failure.json: a short reason people can act on, and a type the daemon can count."""
    name, msg = type(exc).__name__, str(exc).strip()
    first = msg.splitlines()[0] if msg else ""
    if disk_full(exc):
        kind, label = "disk_full", "disk full"
    elif name == "OutOfMemoryError" or "CUDA out of memory" in msg:
        kind, label = "cuda_oom", "CUDA out of memory"
    elif isinstance(exc, MemoryError):
        kind, label = "oom", "out of host memory"
    elif isinstance(exc, EdgezoError):
        kind, label = exc.kind, exc.label
    elif isinstance(exc, (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError)):
        kind, label = "data", "bad data"
    else:
        kind, label = "error", "worker error"
    return {"type": kind, "reason": f"{label}: {name}: {first}"[:500], "exception": name}


# ------------------------------------------------------------------------------ engines
def load_engine(name: str | None = None):
    name = name or os.environ.get("EDGEZO_ENGINE") or "trainer"
    if name == "trainer":
        from edgezo.trainer import run_job

        return run_job
    if name == "synthetic":  # test support: scheduler tests and benchmarks without a model
        from edgezo.testing.synthetic import synthetic_run_job

        return synthetic_run_job
    module, _, func = name.partition(":")
    return getattr(importlib.import_module(module), func or "run_job")


# ------------------------------------------------------------------------------ entry
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgezo.worker", description="run one job under the daemon")
    ap.add_argument("job_dir")
    ap.add_argument("--socket", help="the daemon's socket")
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--engine", help="trainer | synthetic | module:function (default $EDGEZO_ENGINE or trainer)")
    args = ap.parse_args(argv)
    job_dir = Path(args.job_dir)
    hooks = DaemonHooks(args.job_id, args.socket)
    signal.signal(signal.SIGTERM, hooks.request_pause)
    signal.signal(signal.SIGINT, hooks.request_pause)
    hooks.start()
    hooks.on_event("worker", {"pid": os.getpid(), "engine": args.engine or os.environ.get("EDGEZO_ENGINE", "trainer")})
    try:
        engine = load_engine(args.engine)
        engine(job_dir, hooks)
        return Exit.DONE
    except BaseException as e:  # noqa: BLE001 - every way out gets an exit code the daemon understands
        if isinstance(e, Paused):
            hooks._say("paused: checkpointed in the seed-log")
            return Exit.PAUSED
        if isinstance(e, Cancelled):
            hooks._say("cancelled")
            return Exit.CANCELLED
        if isinstance(e, KeyboardInterrupt):
            return Exit.PAUSED
        failure = classify(e)
        with contextlib.suppress(OSError):
            traceback.print_exc()
        hooks._say(f"failed: {failure['reason']}")
        try:
            write_json_atomic(job_dir / FAILURE, failure)
        except OSError:
            pass  # on a full disk the daemon still learns why from the exit code
        return Exit.DISK_FULL if failure["type"] == "disk_full" else Exit.FAILED
    finally:
        hooks.stop()


if __name__ == "__main__":
    sys.exit(main())
