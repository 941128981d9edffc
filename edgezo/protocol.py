"""The worker↔daemon contract, written down once and imported by both sides.

A worker (edgezo/worker.py) runs one job's engine and talks to the daemon (daemon/) over the socket
API. What crosses that seam is defined here: the states a job goes through, the control word the
daemon answers with, the phases a worker is in, the events it posts and the fields the daemon
reads from them, the exit codes, and the errors that carry a `kind` all three sides understand.

Step numbering: a `step` event's `step` is the 0-based index of the step just finished, so after it
`step + 1` steps are done; `start`'s `resumed_from` and a job's `step` are counts of steps done.

Phases: the worker states its phase in every event and heartbeat (`worker_phase`, with
`phase_seq`, which grows at each change so a heartbeat that overtakes an event never rolls the
phase back); the daemon shows what the worker said and never infers it.

Every enum is a `str`/`int` subclass, so values compare equal to (and serialise as) the plain words
that travel in JSON and sit in the store.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum, StrEnum
from typing import Any


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"  # checkpointed in its seed-log; resumes when admitted again
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.QUEUED, JobState.PAUSED, JobState.RUNNING)
FINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Control(StrEnum):
    """The daemon's answer to every worker call: what the worker does at its next step boundary."""

    RUN = "run"
    PAUSE = "pause"  # checkpoint (the seed-log is the checkpoint) and exit with Exit.PAUSED
    STOP = "stop"  # exit with Exit.CANCELLED (or failed, when the daemon is failing the job)
    FINISH = "finish"  # no more steps: evaluate, export and report what there is (benchmarks)


class Phase(StrEnum):
    STARTING = "starting"  # the daemon started a worker that has not said anything yet
    LOAD = "load"  # model, data and seed-log replay
    ZO_STEP = "zo_step"  # zeroth-order training steps: the steady footprint admission plans for
    FO_STEP = "fo_step"  # the first-order baseline's steps (one lease for the whole run)
    EVAL = "eval"  # leased heavy phase
    PROJECTION = "projection"  # DiZO's projection learning: leased heavy phase
    EXPORT = "export"  # every step done: writing the trained model and the report


CHECK_EVAL = "check"  # an eval phase's `what` when it is the guard's held-out check (it counts as training)


def step_phase(method: str | None) -> Phase:
    """What a job's training steps are called: `fo_step` for the first-order baseline."""
    return Phase.FO_STEP if method == "fo" else Phase.ZO_STEP


class Event(StrEnum):
    """What a worker posts (`POST /jobs/ID/events {"kind", "data"}`); the daemon stores each one."""

    WORKER = "worker"  # {pid, engine}: the worker is up
    START = "start"  # {steps_total, resumed_from, step_phase, ...}
    STEP = "step"  # {step (index), loss, lr, steps_per_s, forwards}
    PHASE = "phase"  # {phase, state: begin | end}
    EVAL = "eval"  # {step, tag, metrics}
    PROJECTION = "projection"
    SNAPSHOT = "snapshot"
    ROLLBACK = "rollback"  # {step, to, lr, cause: loss | held_out | end, ...}
    CHECK = "check"  # {step, accuracy, loss, n, best_step, best_accuracy}: the guard's held-out score
    PREFIX = "prefix"
    FINISH = "finish"
    PAUSED = "paused"  # {step}
    CANCELLED = "cancelled"  # {step}
    DONE = "done"  # {report}


class Exit(IntEnum):
    """A worker's exit code; on FAILED and DISK_FULL, JOB_DIR/failure.json says why."""

    DONE = 0
    FAILED = 1
    PAUSED = 3  # checkpointed in the seed-log, resumable
    CANCELLED = 4
    DISK_FULL = 5  # every finished step is in the seed-log; resumes when there is room


class Paused(Exception):
    """An engine's way out when told to pause (Exit.PAUSED)."""


class Cancelled(Exception):
    """An engine's way out when told to stop (Exit.CANCELLED)."""


class EdgezoError(Exception):
    """Base of the errors people can act on: the CLI prints them in one line, the worker writes
    `kind` and `label` to failure.json, and the daemon shows the reason in `edgezo status`."""

    kind = "error"
    label = "error"


# ------------------------------------------------------------------ what the daemon reads from an event
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
EVENT_FIELDS: dict[str, tuple[type, ...]] = {
    "steps_total": (int,), "resumed_from": (int, type(None)), "step": (int,),
    "loss": (int, float, type(None)), "steps_per_s": (int, float, type(None)), "phase": (str,), "state": (str,),
    "step_phase": (str,), "worker_phase": (str,), "phase_seq": (int,),
}


def checked_event(kind: Any, data: Any) -> dict:
    """A worker event's fields, checked before anything is stored: one malformed field (a list where a
    phase name belongs) once made the next database insert raise and ended the daemon. ValueError
    names the field; nothing is changed."""
    if not isinstance(kind, str) or not _NAME.fullmatch(kind):
        raise ValueError(f"event kind must be a short lower-case name, got {str(kind)[:40]!r}")
    return checked_fields(data)


def checked_fields(data: Any) -> dict:
    """The typed fields of an event or heartbeat body (see EVENT_FIELDS)."""
    if not isinstance(data, dict):
        raise ValueError(f"event data must be an object, got {type(data).__name__}")
    for name, types in EVENT_FIELDS.items():
        value = data.get(name)
        if name in data and (not isinstance(value, types) or isinstance(value, bool)):
            raise ValueError(f"event field {name!r} must be {' or '.join(t.__name__ for t in types)}, "
                             f"got {type(value).__name__}")
    for name in ("phase", "step_phase", "worker_phase"):
        if name in data and not _NAME.fullmatch(data[name]):
            raise ValueError(f"event field {name!r} must be a short lower-case name, got {data[name][:40]!r}")
    if data.get("state", "begin") not in ("begin", "end"):
        raise ValueError("event field 'state' must be 'begin' or 'end'")
    try:
        json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"event data cannot be stored: {e}") from None
    return data


class PhaseTracker:
    """The worker's side of "state your phase": a stack of heavy phases over the step phase the
    engine declared at `start` (`load` before it), and `export` once every step is done."""

    def __init__(self) -> None:
        self.base: str = Phase.LOAD
        self.stack: list[str] = []
        self.steps_total: int | None = None
        self.steps_done = 0
        self.stated: tuple[str, int] = (Phase.LOAD, 0)  # (phase, seq), replaced whole: read by the heartbeat thread

    def current(self) -> str:
        if self.stack:
            return self.stack[-1]
        if self.steps_total is not None and self.steps_done >= self.steps_total and self.base != Phase.LOAD:
            return Phase.EXPORT
        return self.base

    def see(self, kind: str, data: dict) -> tuple[str, int]:
        """Update from an event the engine emits; the (phase, seq) to send with it."""
        if kind == Event.START:
            self.steps_total = data.get("steps_total")
            self.steps_done = int(data.get("resumed_from") or 0)
            self.base = data.get("step_phase") or Phase.ZO_STEP
        elif kind == Event.STEP and isinstance(data.get("step"), int):
            self.steps_done = data["step"] + 1
        elif kind == Event.PHASE:
            name = data.get("phase")
            if data.get("state", "begin") == "begin":
                self.stack.append(name)
            elif name in self.stack:
                del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name)]
        now, seq = self.current(), self.stated[1]
        if now != self.stated[0]:
            self.stated = (now, seq + 1)
        return self.stated

    def stamp(self, kind: str, data: dict) -> dict:
        """`data` with the worker's phase after this event, as every event carries it."""
        phase, seq = self.see(kind, data)
        return {**data, "worker_phase": str(phase), "phase_seq": seq}
