"""Test support: a worker engine with the trainer's contract and no model.

`EDGEZO_ENGINE=synthetic` (the daemon's `--engine synthetic`) runs this instead of the trainer:
timed steps, a resumable progress log, and leased heavy phases that really allocate memory, so the
scheduler's tests and benchmarks (bench/stagger.py, bench/load.py) exercise admission, leases,
pressure, pauses and faults in seconds. Knobs in EDGEZO_SYNTHETIC, e.g.
"step_s=0.05,heavy_every=5,heavy_bytes=64MiB,heavy_s=0.5,base_bytes=0,record_bytes=0".
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgezo.hooks import TrainerHooks
from edgezo.jobdir import REPORT, SYNTHETIC_LOG, write_json_atomic
from edgezo.protocol import Cancelled, Control, Event, JobState, Paused, Phase
from edgezo.spec import read_job_spec
from edgezo.timeweighted import summarize


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
    spec = read_job_spec(job_dir)
    k = _knobs()
    total, every = int(spec["steps"]), max(int(k["heavy_every"]), 1)
    log_path = job_dir / SYNTHETIC_LOG
    text = log_path.read_bytes() if log_path.exists() else b""
    if text and not text.endswith(b"\n"):
        text = text[: text.rfind(b"\n") + 1]
        os.truncate(log_path, len(text))
    done = text.count(b"\n")
    pad = "x" * max(int(k["record_bytes"]) - 1, 0)
    base = bytearray(b"\x01") * int(k["base_bytes"]) if k["base_bytes"] else b""
    samples: list[tuple[float, int, str]] = []  # summarised like the daemon's (edgezo.timeweighted)

    def meter(phase: str) -> None:
        samples.append((time.monotonic(), rss_bytes(), phase))

    def heavy(phase: str) -> None:
        hooks.on_event(Event.PHASE, {"phase": phase, "state": "begin"})
        block = bytearray(b"\x01") * int(k["heavy_bytes"])
        end = time.monotonic() + k["heavy_s"]
        while time.monotonic() < end:
            time.sleep(min(0.02, k["heavy_s"]))
            meter(phase)
        del block
        hooks.on_event(Event.PHASE, {"phase": phase, "state": "end"})

    hooks.on_event(Event.START, {"steps_total": total, "resumed_from": done, "step_phase": Phase.ZO_STEP})
    pending = 0  # heavy phases due and not yet run: deferred while no lease, never dropped
    heavy_runs = 0
    t0 = time.monotonic()

    def run_heavy() -> None:
        nonlocal heavy_runs
        try:
            heavy(Phase.EVAL)
            heavy_runs += 1
        finally:
            hooks.release_lease(Phase.EVAL)

    with open(log_path, "a") as log:
        step = done
        while step < total:
            action = hooks.control()
            if action in (Control.PAUSE, Control.STOP):
                hooks.on_event(Event.PAUSED if action == Control.PAUSE else Event.CANCELLED, {"step": step})
                raise Paused(step) if action == Control.PAUSE else Cancelled(step)
            time.sleep(k["step_s"])
            meter(Phase.ZO_STEP)
            log.write(f"{step} {pad}\n" if pad else f"{step}\n")
            log.flush()
            os.fsync(log.fileno())
            hooks.on_event(Event.STEP, {"step": step, "loss": 1.0 / (step + 1), "lr": 0.0,
                                    "steps_per_s": (step + 1 - done) / max(time.monotonic() - t0, 1e-9)})
            step += 1
            if step % every == 0 and step < total:
                pending += 1
            if pending and hooks.try_lease(Phase.EVAL, int(k["heavy_bytes"])):
                run_heavy()
                pending -= 1
    for _ in range(pending + 1):  # what is still due, then the final phase
        while not hooks.try_lease(Phase.EVAL, int(k["heavy_bytes"])):
            action = hooks.control()  # the trainer's contract: obey pause/stop while waiting
            if action in (Control.PAUSE, Control.STOP):
                hooks.on_event(Event.PAUSED if action == Control.PAUSE else Event.CANCELLED, {"step": total})
                raise Paused(total) if action == Control.PAUSE else Cancelled(total)
            time.sleep(0.05)
        run_heavy()
    del base
    summary = summarize(samples)
    report = {
        "status": JobState.DONE,
        "steps_done": total,
        "metrics": {"zero_shot": None, "final": None, "history": [], "heavy_phases": heavy_runs},
        "memory": {"meter": "synthetic:rss", "device": "cpu", "peak_bytes": summary["peak_bytes"],
                   "avg_bytes": summary["avg_bytes"], "phases": summary["phases"], "sources": {"rss": "psutil"}},
    }
    write_json_atomic(job_dir / REPORT, report)
    hooks.on_event(Event.DONE, {"report": {"status": JobState.DONE, "steps_done": total}})
    return report


