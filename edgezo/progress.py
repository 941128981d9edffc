"""One progress line for a daemon job, shared by `edgezo quickstart` and `edgezo status JOB --watch`.

The line: steps done of the total, the last loss, steps/s, the ETA of the steps left (steps left ÷
steps/s), the worker's memory now and its peak, the phase and the lease the job holds. On a
terminal it is redrawn in place. Anywhere else (captured output, CI logs, the journal) a plain line
is printed when the state, phase or reason changes, at the first step of a run (so the rate and ETA
show early), and otherwise at most every `every` seconds. Each evaluation prints a line of its own.

It follows the daemon's events (every step and eval, none missed between two polls) and the job's
view (memory, phase, lease), polled once a second.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from edgezo.protocol import FINAL, Control, Event, JobState, step_phase
from policies.memory import fmt_bytes

EVERY_S = 30.0  # plain output: at most one line this often, besides changes and evals
POLL_S = 1.0
BAR = 20


def fmt_duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_s(info: dict) -> float | None:
    """Seconds until the last step at the current rate; None before the rate is known."""
    rate, total, step = info.get("steps_per_s"), info.get("steps_total"), info.get("step") or 0
    if not rate or not total or rate <= 0:
        return None
    return max(total - step, 0) / rate


def _lease(info: dict) -> str:
    cells = [f"{x['phase']} {fmt_bytes(x.get('bytes') or None)}" if x.get("state") == "granted"
             else f"{x['phase']} waiting" for x in info.get("leases") or []]
    return ", ".join(cells)


def _state(info: dict) -> str:
    state = info.get("state", "?")
    if state == JobState.RUNNING and info.get("control") == Control.PAUSE:
        return "pausing"
    if state == JobState.RUNNING and info.get("control") == Control.STOP:
        return "stopping"
    return state


def progress_line(info: dict, elapsed: float | None = None, bar: bool = False) -> str:
    """One line from a daemon job view (GET /jobs/{id}), e.g.
    `[1m12s] rt-sentiment-1 running 17/60  loss 0.6931  0.41 steps/s  ETA 1m45s  mem 702.3 MiB (peak 741.0 MiB)  zo_step`."""
    step, total = info.get("step") or 0, info.get("steps_total") or 0
    parts = [f"[{fmt_duration(elapsed)}]" if elapsed is not None else "", str(info.get("id", "?")), _state(info)]
    if bar and total:
        filled = int(BAR * min(step / total, 1.0))
        parts.append("[" + "#" * filled + "." * (BAR - filled) + "]")
    parts.append(f"{step}/{total or '?'}")
    fields = []
    if isinstance(info.get("loss"), (int, float)):
        fields.append(f"loss {info['loss']:.4f}")
    if info.get("steps_per_s"):
        fields.append(f"{info['steps_per_s']:.2f} steps/s")
    eta = eta_s(info)
    if eta is not None and info.get("state") == JobState.RUNNING:
        fields.append(f"ETA {fmt_duration(eta)}")
    if info.get("state") == JobState.RUNNING and info.get("mem_now"):
        fields.append(f"mem {fmt_bytes(info['mem_now'] or None)} (peak {fmt_bytes(info.get('mem_peak') or None)})")
    elif info.get("mem_peak"):
        fields.append(f"peak {fmt_bytes(info['mem_peak'] or None)}")
    if info.get("state") == JobState.RUNNING and info.get("phase"):
        fields.append(str(info["phase"]))
    if _lease(info):
        fields.append(f"lease {_lease(info)}")
    if info.get("reason") and (info.get("state") != JobState.RUNNING or info.get("control") != Control.RUN):
        fields.append(f"({info['reason']})")
    return " ".join(p for p in parts if p) + ("  " + "  ".join(fields) if fields else "")


def eval_line(job_id: str, data: dict, elapsed: float | None = None) -> str:
    """An evaluation's result: `[2m03s] rt-sentiment-1 eval (zero-shot) at step 0: accuracy 78.5 %, loss 0.4512 (n=200)`."""
    m = data.get("metrics") or {}
    shown = [f"{k} {100 * m[k]:.1f} %" for k in ("accuracy", "exact_match", "f1") if isinstance(m.get(k), (int, float))]
    if isinstance(m.get("loss"), (int, float)):
        shown.append(f"loss {m['loss']:.4f}")
    tag = str(data.get("tag") or "eval").replace("_", "-")
    head = f"[{fmt_duration(elapsed)}] " if elapsed is not None else ""
    return f"{head}{job_id} eval ({tag}) at step {data.get('step')}: {', '.join(shown) or '-'} (n={m.get('n', '?')})"


def _key(view: dict) -> tuple:
    """What, when it changes, gets a line of its own in plain output."""
    return view.get("state"), view.get("control"), view.get("phase"), view.get("reason")


class ProgressPrinter:
    """Draws a job's progress from its events and views; see the module docstring for when."""

    def __init__(self, job_id: str, out: TextIO, *, tty: bool | None = None, every: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.job_id, self.out, self.every, self.clock = job_id, out, every, clock
        self.tty = out.isatty() if tty is None else tty
        self.view: dict[str, Any] = {"id": job_id}
        self.t0 = clock()
        self._key: tuple | None = None
        self._printed = float("-inf")
        self._stepped = False  # a step of this run was shown
        self._live = False  # a redrawable line is on the terminal

    def feed(self, events: list[dict], info: dict | None, catch_up: bool = False) -> None:
        """Daemon events since the last call, then the job's current view. `catch_up`: the events are
        history (watching a job that already ran): only evaluations are printed from them."""
        for ev in events:
            kind, data = ev.get("kind"), ev.get("data") or {}
            if kind == "start":
                self._stepped = False
                self.view["steps_total"] = data.get("steps_total", self.view.get("steps_total"))
            elif kind == "step":
                self.view.update(step=int(data.get("step", 0)) + 1, loss=data.get("loss"),
                                 steps_per_s=data.get("steps_per_s"), state=JobState.RUNNING,
                                 phase=step_phase(self.view.get("method")))
                if not self._stepped and not catch_up and not self.tty:  # a terminal redraws anyway
                    self._line(progress_line(self.view, self._elapsed()))
                    self._key = _key(self.view)
                self._stepped = True
            elif kind == Event.EVAL:
                self._line(eval_line(self.job_id, data, self._elapsed()))
        if info is None:
            return
        self.view = {**self.view, **info}
        key = _key(self.view)
        if self.tty:
            self._redraw(progress_line(self.view, self._elapsed(), bar=True))
            if key[0] in FINAL:
                self.finish()
        elif key != self._key or self.clock() - self._printed >= self.every:
            self._line(progress_line(self.view, self._elapsed()))
        self._key = key

    def finish(self) -> None:
        """Leave the terminal on a fresh line."""
        if self._live:
            self.out.write("\n")
            self.out.flush()
            self._live = False

    def _elapsed(self) -> float:
        return self.clock() - self.t0

    def _line(self, text: str) -> None:
        """A line that stays (on a terminal, above the live one)."""
        self.out.write(("\r\x1b[K" if self._live else "") + text + "\n")
        self.out.flush()
        self._live = False
        self._printed = self.clock()

    def _redraw(self, text: str) -> None:
        width = shutil.get_terminal_size((120, 24)).columns - 1
        self.out.write("\r\x1b[K" + text[:width])
        self.out.flush()
        self._live = True


def follow_job(client, job_id: str, out: TextIO = sys.stderr, *, tty: bool | None = None,
               every: float = EVERY_S, poll_s: float = POLL_S) -> dict:
    """Follow a daemon job until it ends, drawing its progress on `out`; returns its last view."""
    printer = ProgressPrinter(job_id, out, tty=tty, every=every)
    after, first = 0, True
    try:
        while True:
            events: list[dict] = []
            while True:  # the API answers at most 1000 events a call
                batch = client.events(job_id, after)
                events += batch
                if batch:
                    after = batch[-1]["id"]
                if len(batch) < 1000:
                    break
            info = client.job(job_id)
            printer.feed(events, info, catch_up=first)
            first = False
            if info.get("state") in FINAL:
                return info
            time.sleep(poll_s)
    finally:
        printer.finish()
