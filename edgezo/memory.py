"""The worker-side memory meter: peak and time-weighted average, overall and per phase.

A background thread samples every `interval` seconds; entering or leaving a phase samples at once,
so a short phase still gets two samples. The average is time-weighted with step-hold: a sample's
value holds until the next one, which is what an allocator's state does between observations.
On CUDA, torch's max_memory_allocated since the previous sample is folded in (then reset), so a
spike shorter than the interval still counts towards the peak.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from edgezo import nvml


class Accumulator:
    """Peak and step-hold time-weighted average of a series of (t, value) samples."""

    def __init__(self) -> None:
        self.peak = 0
        self.area = 0.0
        self.duration = 0.0
        self.samples = 0
        self._last: tuple[float, int] | None = None

    def add(self, t: float, value: int, peak: int | None = None) -> None:
        if self._last is not None:
            dt = max(0.0, t - self._last[0])
            self.area += self._last[1] * dt
            self.duration += dt
        self._last = (t, value)
        self.peak = max(self.peak, value, peak or 0)
        self.samples += 1

    def cut(self) -> None:
        """The series pauses here (a phase ended): the next sample starts a new stretch."""
        self._last = None

    @property
    def average(self) -> int:
        if self.duration > 0:
            return int(self.area / self.duration)
        return self._last[1] if self._last else self.peak

    def as_dict(self) -> dict:
        return {"peak_bytes": int(self.peak), "avg_bytes": int(self.average)}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


class MemoryMeter:
    MAX_TIMELINE = 5000

    def __init__(self, device: str = "cpu", interval: float = 0.1):
        self.device = device
        self.interval = interval
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._stack: list[str] = []
        self._overall: dict[str, Accumulator] = {}
        self._phases: dict[str, dict[str, Accumulator]] = {}
        self._t0 = time.monotonic()
        self._timeline: list[tuple[float, str, int]] = []
        self._stride = 1
        self._tick = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> MemoryMeter:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="edgezo-meter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.sample()

    def __enter__(self) -> MemoryMeter:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    # --- phases ------------------------------------------------------------------------------
    @property
    def current_phase(self) -> str:
        return self._stack[-1] if self._stack else "idle"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sample()
        with self._lock:
            self._cut(self.current_phase)
            self._stack.append(name)
        self.sample()
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self._cut(name)
                self._stack.pop()
            self.sample()

    def _cut(self, phase: str) -> None:
        for acc in self._phases.get(phase, {}).values():
            acc.cut()

    # --- sampling ----------------------------------------------------------------------------
    def _cuda(self) -> bool:
        return self.device.startswith("cuda") and "torch" in sys.modules

    def read(self) -> tuple[dict[str, int], dict[str, int]]:
        """Current values per source, and peaks since the previous read where the source keeps one."""
        values: dict[str, int] = {"rss": nvml.rss_bytes(self.pid)}
        peaks: dict[str, int] = {}
        if self._cuda():
            import torch

            idx = torch.device(self.device).index or 0
            values["torch_allocated"] = torch.cuda.memory_allocated(idx)
            values["torch_reserved"] = torch.cuda.memory_reserved(idx)
            peaks["torch_allocated"] = torch.cuda.max_memory_allocated(idx)
            peaks["torch_reserved"] = torch.cuda.max_memory_reserved(idx)
            torch.cuda.reset_peak_memory_stats(idx)
            used = nvml.process_memory([self.pid], index=idx).get(self.pid)
            if used is not None:
                values["nvml_process"] = used
        return values, peaks

    def sample(self) -> None:
        try:
            values, peaks = self.read()
        except Exception as e:  # the meter must never take the trainer down
            if len(self.errors) < 10:
                self.errors.append(repr(e))
            return
        t = time.monotonic() - self._t0
        with self._lock:
            phase = self.current_phase
            per_phase = self._phases.setdefault(phase, {})
            for src, v in values.items():
                self._overall.setdefault(src, Accumulator()).add(t, v, peaks.get(src))
                per_phase.setdefault(src, Accumulator()).add(t, v, peaks.get(src))
            self._tick += 1
            if self._tick % self._stride == 0:
                self._timeline.append((t, phase, values[self.primary(values)]))
                if len(self._timeline) > self.MAX_TIMELINE:
                    self._timeline = self._timeline[::2]
                    self._stride *= 2

    def primary(self, sources) -> str:
        for s in ("nvml_process", "torch_reserved", "rss"):
            if s in sources:
                return s
        return "rss"

    # --- results -----------------------------------------------------------------------------
    def summary(self) -> dict:
        with self._lock:
            prim = self.primary(self._overall)
            overall = self._overall.get(prim, Accumulator())
            phases = {}
            for name, accs in self._phases.items():
                if name == "idle" or prim not in accs:
                    continue
                a = accs[prim]
                phases[name] = {**a.as_dict(), "duration_s": round(a.duration, 3), "samples": a.samples,
                                "sources": {s: x.as_dict() for s, x in accs.items()}}
            out = {
                "meter": prim,
                "device": self.device,
                **overall.as_dict(),
                "duration_s": round(overall.duration, 3),
                "sources": {s: a.as_dict() for s, a in self._overall.items()},
                "phases": phases,
            }
        if not self._cuda():
            out["note"] = "no GPU: figures are this process's RSS (system memory)"
        if self.errors:
            out["errors"] = list(self.errors)
        return out

    def timeline(self) -> list[tuple[float, str, int]]:
        with self._lock:
            return list(self._timeline)
