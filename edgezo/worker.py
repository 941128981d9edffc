"""A daemon-supervised worker: `python -m edgezo.worker JOB_DIR --socket SOCK --job-id ID`.

Runs one job's engine in its own process and talks to the daemon over the socket API through
`DaemonHooks`: events are posted, leases are asked for (never waited on), a heartbeat thread keeps
leases alive and carries the daemon's control word (run / pause / stop) back.

Exit codes: 0 done, 3 paused (checkpointed in the seed-log, resumable), 4 cancelled, 1 failed —
and on failure `JOB_DIR/failure.json` {"reason", "type"} says why (CUDA OOM, data, spec, ...).

Engines (env EDGEZO_ENGINE): "trainer" (default, `edgezo.trainer.run_job`), "synthetic" (no
model: timed steps and heavy phases that really allocate memory, for scheduler tests and
benchmarks; knobs in EDGEZO_SYNTHETIC="step_s=0.05,heavy_every=5,heavy_bytes=64MiB,heavy_s=0.5"),
or "package.module:function" with run_job's signature.
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

EXIT_DONE, EXIT_FAILED, EXIT_PAUSED, EXIT_CANCELLED, EXIT_DISK_FULL = 0, 1, 3, 4, 5
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
        self._control = "run"
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
        if isinstance(answer, dict) and answer.get("control") in ("run", "pause", "stop"):
            self._control = answer["control"]
        return answer

    def _beat(self) -> None:
        client = Client(self.socket_path, timeout=5)
        try:
            while not self._stop.wait(self.heartbeat_s):
                try:  # the heartbeat outlives any one failure: a 7 s daemon stall once ended it for good
                    self._post("POST", f"/jobs/{self.job_id}/heartbeat", {"pid": os.getpid()}, client=client)
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
        item = (kind, _jsonable(data))
        if self._sender is None:  # not started (tests): deliver inline
            self._post("POST", f"/jobs/{self.job_id}/events", {"kind": kind, "data": item[1]})
            return
        with self._outbox_cv:
            if kind == "step" and len(self._outbox) > 1 and self._outbox[-1][0] == "step":
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
        if self._control == "stop":
            return "stop"
        if self._local_pause or self._control == "pause":
            return "pause"
        if self._unreachable_since is not None and time.monotonic() - self._unreachable_since > UNREACHABLE_PAUSE_S:
            return "pause"
        return "run"

    def _say(self, line: str) -> None:
        if line:
            with contextlib.suppress(OSError):  # a full disk fails the job's writes, not its log lines
                print(f"{time.strftime('%H:%M:%S')} {line}", file=self.log, flush=True)


def _describe(kind: str, data: dict, hooks: DaemonHooks) -> str:
    if kind == "start":
        hooks.steps_total = data.get("steps_total")
        return f"start: {data.get('steps_total')} steps, resumed from {data.get('resumed_from', 0)}"
    if kind == "step":
        rate = data.get("steps_per_s")
        return (f"step {int(data.get('step', 0)) + 1}/{hooks.steps_total or '?'} loss {data.get('loss', float('nan')):.4f}"
                + (f" {rate:.2f} steps/s" if rate else ""))
    if kind == "eval":
        shown = {k: v for k, v in (data.get("metrics") or {}).items() if k != "correct"}
        return f"eval at step {data.get('step')}: {json.dumps(shown)}"
    if kind == "done":
        return "done"
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
    elif name == "SpecError":
        kind, label = "spec", "bad spec"
    elif name == "DataError" or isinstance(exc, (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError)):
        kind, label = "data", "bad data"
    elif name == "ModelError":
        kind, label = "model", "model could not be loaded"
    elif name == "SeedLogError":
        kind, label = "seedlog", "seed-log error"
    elif name == "TrainingError":
        kind, label = "training", "training diverged"
    else:
        kind, label = "error", "worker error"
    return {"type": kind, "reason": f"{label}: {name}: {first}"[:500], "exception": name}


# ------------------------------------------------------------------------------ engines
def load_engine(name: str | None = None):
    name = name or os.environ.get("EDGEZO_ENGINE") or "trainer"
    if name == "trainer":
        from edgezo.trainer import run_job

        return run_job
    if name == "synthetic":
        return synthetic_run_job
    module, _, func = name.partition(":")
    return getattr(importlib.import_module(module), func or "run_job")


class Paused(Exception):
    pass


class Cancelled(Exception):
    pass


def _knobs() -> dict[str, float]:
    from edgezo.spec import parse_size

    out = {"step_s": 0.05, "heavy_every": 5.0, "heavy_bytes": 64 * 2**20, "heavy_s": 0.5, "base_bytes": 0.0,
           "record_bytes": 0.0}
    for item in filter(None, os.environ.get("EDGEZO_SYNTHETIC", "").split(",")):
        k, _, v = item.partition("=")
        k = k.strip()
        out[k] = float(parse_size(v, k)) if k.endswith("_bytes") else float(v)
    return out


def synthetic_run_job(job_dir: Path, hooks: TrainerHooks) -> dict:
    """A stand-in engine with the trainer's contract: steps, a resumable log, leased heavy phases.

    Each heavy phase really allocates and touches `heavy_bytes`, so the daemon's RSS meter sees it.
    The progress log (one line per step, fsynced, `record_bytes` long like a seed-log frame) plays the
    seed-log's part for resume; a torn last line (a crash or a full disk mid-write) is cut off.
    """
    from edgezo.nvml import rss_bytes

    job_dir = Path(job_dir)
    spec = json.loads((job_dir / "spec.json").read_text())
    k = _knobs()
    total, every = int(spec["steps"]), max(int(k["heavy_every"]), 1)
    log_path = job_dir / "synthetic.log"
    text = log_path.read_bytes() if log_path.exists() else b""
    if text and not text.endswith(b"\n"):
        text = text[: text.rfind(b"\n") + 1]
        os.truncate(log_path, len(text))
    done = text.count(b"\n")
    pad = "x" * max(int(k["record_bytes"]) - 1, 0)
    base = bytearray(b"\x01") * int(k["base_bytes"]) if k["base_bytes"] else b""
    phases: dict[str, dict[str, float]] = {}
    t_last = [time.monotonic()]

    def meter(phase: str) -> None:
        now = time.monotonic()
        rss = rss_bytes()
        p = phases.setdefault(phase, {"peak_bytes": 0, "area": 0.0, "duration_s": 0.0})
        dt = now - t_last[0]
        t_last[0] = now
        p["peak_bytes"] = max(p["peak_bytes"], rss)
        p["area"] += rss * dt
        p["duration_s"] += dt

    def heavy(phase: str) -> None:
        hooks.on_event("phase", {"phase": phase, "state": "begin"})
        block = bytearray(b"\x01") * int(k["heavy_bytes"])
        end = time.monotonic() + k["heavy_s"]
        while time.monotonic() < end:
            time.sleep(min(0.02, k["heavy_s"]))
            meter(phase)
        del block
        hooks.on_event("phase", {"phase": phase, "state": "end"})

    hooks.on_event("start", {"steps_total": total, "resumed_from": done})
    pending = 0  # heavy phases due and not yet run: deferred while no lease, never dropped
    heavy_runs = 0
    t0 = time.monotonic()

    def run_heavy() -> None:
        nonlocal heavy_runs
        try:
            heavy("eval")
            heavy_runs += 1
        finally:
            hooks.release_lease("eval")

    with open(log_path, "a") as log:
        step = done
        while step < total:
            action = hooks.control()
            if action in ("pause", "stop"):
                hooks.on_event("paused" if action == "pause" else "cancelled", {"step": step})
                raise Paused(step) if action == "pause" else Cancelled(step)
            time.sleep(k["step_s"])
            meter("zo_step")
            log.write(f"{step} {pad}\n" if pad else f"{step}\n")
            log.flush()
            os.fsync(log.fileno())
            hooks.on_event("step", {"step": step, "loss": 1.0 / (step + 1), "lr": 0.0,
                                    "steps_per_s": (step + 1 - done) / max(time.monotonic() - t0, 1e-9)})
            step += 1
            if step % every == 0 and step < total:
                pending += 1
            if pending and hooks.try_lease("eval", int(k["heavy_bytes"])):
                run_heavy()
                pending -= 1
    for _ in range(pending + 1):  # what is still due, then the final phase
        while not hooks.try_lease("eval", int(k["heavy_bytes"])):
            action = hooks.control()  # the trainer's contract: obey pause/stop while waiting
            if action in ("pause", "stop"):
                hooks.on_event("paused" if action == "pause" else "cancelled", {"step": total})
                raise Paused(total) if action == "pause" else Cancelled(total)
            time.sleep(0.05)
        run_heavy()
    del base
    mem = {n: {"peak_bytes": int(p["peak_bytes"]), "avg_bytes": int(p["area"] / p["duration_s"]) if p["duration_s"] else 0,
               "duration_s": round(p["duration_s"], 3)} for n, p in phases.items()}
    area = sum(p["area"] for p in phases.values())
    dur = sum(p["duration_s"] for p in phases.values())
    report = {
        "status": "done",
        "steps_done": total,
        "metrics": {"zero_shot": None, "final": None, "history": [], "heavy_phases": heavy_runs},
        "memory": {"meter": "synthetic:rss", "device": "cpu",
                   "peak_bytes": max((p["peak_bytes"] for p in mem.values()), default=0),
                   "avg_bytes": int(area / dur) if dur else 0, "phases": mem, "sources": {"rss": "psutil"}},
    }
    (job_dir / "report.json.tmp").write_text(json.dumps(report, indent=2))
    os.replace(job_dir / "report.json.tmp", job_dir / "report.json")
    hooks.on_event("done", {"report": {"status": "done", "steps_done": total}})
    return report


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
        return EXIT_DONE
    except BaseException as e:  # noqa: BLE001 - every way out gets an exit code the daemon understands
        name = type(e).__name__
        if name == "Paused":
            hooks._say("paused: checkpointed in the seed-log")
            return EXIT_PAUSED
        if name == "Cancelled":
            hooks._say("cancelled")
            return EXIT_CANCELLED
        if isinstance(e, KeyboardInterrupt):
            return EXIT_PAUSED
        failure = classify(e)
        with contextlib.suppress(OSError):
            traceback.print_exc()
        hooks._say(f"failed: {failure['reason']}")
        try:
            (job_dir / "failure.json").write_text(json.dumps(failure, indent=2) + "\n")
        except OSError:
            pass  # on a full disk the daemon still learns why from the exit code
        return EXIT_DISK_FULL if failure["type"] == "disk_full" else EXIT_FAILED
    finally:
        hooks.stop()


if __name__ == "__main__":
    sys.exit(main())
