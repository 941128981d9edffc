"""The worker-side memory meter: peak and time-weighted average memory, overall and per phase.

A background thread samples every ``interval`` seconds, and every phase change samples at
once, so even a phase shorter than the interval has a reading at each end. Per reading,
each source gives a *level* (what is held now) and an *interval peak* (the most held since
the previous reading), so spikes between readings still reach the peak:

* ``rss`` — this process's resident set (psutil); its interval peak is the kernel's
  ``VmHWM``, reset after each reading through ``/proc/self/clear_refs`` where Linux allows.
* ``torch_allocated`` / ``torch_reserved`` — the CUDA caching allocator (cuda only); the
  interval peak is ``max_memory_allocated``/``_reserved``, reset after each reading.
* ``nvml_process`` — what NVML says this pid holds on the GPU, CUDA context included.

The meter therefore owns the process's peak counters: code that reads
``torch.cuda.max_memory_allocated`` or ``VmHWM`` itself sees peaks since the last sample.

Averages are time-weighted with the **trapezoid rule** (edgezo/timeweighted.py, the one rule the
daemon uses too), so a phase with only its two boundary readings averages them both.
Torch is never imported here unless the meter measures a CUDA device (the worker
already uses torch then); importing this module stays light. One module: the sources, the
sampler thread and the per-phase summary share the reset rules of the peak counters above.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Container, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edgezo import nvml
from edgezo.protocol import Phase
from edgezo.timeweighted import Accumulator

__all__ = ["KNOWN_PHASES", "Accumulator", "MemoryLog", "MemoryMeter", "read_memory_log"]

KNOWN_PHASES = (Phase.ZO_STEP, Phase.FO_STEP, Phase.EVAL, Phase.PROJECTION, Phase.EXPORT, Phase.LOAD)
NO_PHASE = ""  # the timeline's phase for readings taken outside any phase
# Preferred primary source on a CUDA device, best first; on CPU it is always "rss".
CUDA_PRIMARY_ORDER = ("nvml_process", "torch_reserved", "rss")
MAX_TIMELINE_POINTS = 5000
MEMORY_LOG = "memory.jsonl"  # the worker's own samples, in the job directory
MEMORY_LOG_EVERY_S = 1.0
MAX_ERRORS_KEPT = 20

# One reading: source name -> (level bytes, peak bytes since the previous reading).
Reading = dict[str, tuple[int, int]]


class _Timeline:
    """(t, phase, bytes) points kept under a cap by merging neighbours, keeping each max.

    Merging keeps the larger point so spikes survive on plots; once the cap is hit, every
    later point stands for ``stride`` readings (again their max).
    """

    def __init__(self, max_points: int = MAX_TIMELINE_POINTS) -> None:
        self.max_points = max(2, max_points)
        self._points: list[tuple[float, str, int]] = []
        self._stride = 1
        self._pending: tuple[float, str, int] | None = None
        self._pending_count = 0

    def add(self, t: float, phase: str, value: int) -> None:
        if self._pending is None or value > self._pending[2]:
            self._pending = (t, phase, value)
        self._pending_count += 1
        if self._pending_count >= self._stride:
            self._points.append(self._pending)
            self._pending, self._pending_count = None, 0
        if len(self._points) > self.max_points:
            pts = self._points
            self._points = [max(pts[i : i + 2], key=lambda p: p[2]) for i in range(0, len(pts), 2)]
            self._stride *= 2

    def points(self) -> list[tuple[float, str, int]]:
        return self._points + ([self._pending] if self._pending else [])


class MemoryLog:
    """The meter's readings appended to ``memory.jsonl`` in the job directory, so a finished job's
    memory timeline can be drawn from its directory alone (no daemon, no store).

    One line ``{"t": wall-clock s, "phase", "bytes", "source"}`` at most every ``every`` seconds,
    holding the most memory read since the previous line, plus up to two at each phase change (the
    old phase's last, the new one's first), so short phases show and a 10-minute job writes about
    600 lines. Readings between phases (the loop's own
    work between two steps) count to the phase before them. Wall-clock times let a resumed run
    append to the same file. A torn last line (a crash mid-write) is skipped by the reader.
    """

    def __init__(self, path: Path, every: float = MEMORY_LOG_EVERY_S, clock: Callable[[], float] = time.time):
        self.path, self.every, self._clock = Path(path), float(every), clock
        self._phase: str | None = None
        self._written = float("-inf")
        self._most: tuple[float, int, str] | None = None  # (t, bytes, source) of the largest unwritten reading

    def add(self, phase: str, nbytes: int, source: str) -> None:
        now = self._clock()
        phase = phase or self._phase or NO_PHASE  # between two steps is still training, not a new phase
        if not phase:
            return  # the instant before the first phase (load) begins
        if phase != self._phase:
            self.flush()
            self._write(now, phase, nbytes, source)
            return
        if self._most is None or nbytes > self._most[1]:
            self._most = (now, nbytes, source)
        if now - self._written >= self.every:
            self.flush()

    def flush(self) -> None:
        """Write the largest reading not written yet (at a phase change, and when the run ends)."""
        if self._most is not None and self._phase:
            t, most, source = self._most
            self._most = None
            self._write(t, self._phase, most, source)

    def _write(self, t: float, phase: str, nbytes: int, source: str) -> None:
        self._phase, self._written = phase, self._clock()
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"t": round(t, 3), "phase": phase, "bytes": int(nbytes), "source": source}) + "\n")
        except OSError:
            pass  # a full disk must not take the trainer down; the report still has the summary


def read_memory_log(job_dir: Path) -> list[dict]:
    """A job directory's memory samples (``MemoryLog`` lines), oldest first; [] when it has none."""
    path = Path(job_dir) / MEMORY_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if isinstance(row, dict) and isinstance(row.get("t"), (int, float)) and isinstance(row.get("bytes"), int):
            out.append(row)
    return out



_LIBC: Any = None


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim), so a worker's RSS, which the daemon
    budgets on a CPU, comes back down after a heavy phase. It replaces running workers with
    MALLOC_MMAP_THRESHOLD_=1MiB, which did the same by sending every allocation of 1 MiB or more to
    mmap and made the fzoo default job's steps 1.5x slower on 2 CPU cores (a munmap and fresh page
    faults for each of its 128 short forwards). Where there is no glibc there is nothing to do."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False

@dataclass
class _PhaseStats:
    sources: dict[str, Accumulator] = field(default_factory=dict)
    duration: float = 0.0  # time this phase was the innermost one
    samples: int = 0

    def acc(self, source: str) -> Accumulator:
        return self.sources.setdefault(source, Accumulator())

    def pause(self) -> None:
        for acc in self.sources.values():
            acc.pause()


# --------------------------------------------------------------------------- sources

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_HWM_RE = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


class _RssReader:
    """RSS level, and the peak since the last read from VmHWM when the kernel lets us reset it."""

    def __init__(self, track_peak: bool) -> None:
        self._proc = psutil.Process(os.getpid())
        self._track_peak = track_peak and sys.platform.startswith("linux")
        if self._track_peak:
            self._track_peak = self._read_hwm() is not None and self._reset_hwm()

    @staticmethod
    def _read_hwm() -> int | None:
        try:
            match = _HWM_RE.search(_PROC_STATUS.read_text())
        except OSError:
            return None
        return int(match.group(1)) * 1024 if match else None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    @property
    def tracks_peak(self) -> bool:
        return self._track_peak

    def read(self) -> tuple[int, int]:
        rss = int(self._proc.memory_info().rss)
        if not self._track_peak:
            return rss, rss
        hwm = self._read_hwm()
        self._track_peak = hwm is not None and self._reset_hwm()
        return rss, max(rss, hwm or 0)


def _parse_device(device: str) -> tuple[str, int | None]:
    """("cpu", None) or ("cuda", index); a bare "cuda" leaves the index to be resolved."""
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return "cpu", None
    if kind != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', not {device!r}")
    return "cuda", int(index) if index else None


class MemoryMeter:
    """Samples this process's memory in the background and accounts it per phase.

    Use as a context manager (or ``start()``/``stop()``), wrap work in ``meter.phase(name)``
    (phases nest; the innermost wins), and read ``summary()`` for report.json's ``memory``.
    Sampling never raises into the trainer: failures are recorded in ``summary()["errors"]``.
    The phase stack is the meter's, not a thread's: phases come from the trainer's thread.
    Use one meter per process, since each resets the process-wide peak counters.
    """

    def __init__(
        self,
        device: str = "cpu",
        interval: float = 0.1,
        *,
        track_rss_peak: bool = True,
        max_timeline_points: int = MAX_TIMELINE_POINTS,
        clock: Callable[[], float] = time.monotonic,
        on_reading: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.kind, self._cuda_index = _parse_device(device)
        self.interval = float(interval)
        self._clock = clock
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rss = _RssReader(track_rss_peak)
        self._torch: Any = None
        self._nvml_index: int | None = None
        self._nvml_resolved = False
        self._stack: list[str] = []
        self._t0: float | None = None
        self._last_t = 0.0
        self._phase_since = 0.0
        self._overall: dict[str, Accumulator] = {}
        self._phases: dict[str, _PhaseStats] = {}
        self._timeline = _Timeline(max_timeline_points)
        self._on_reading = on_reading  # (phase, primary-source bytes, source), e.g. MemoryLog.add
        self._samples = 0
        self._errors: list[str] = []
        self._error_count = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def device(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self._cuda_index or 0}"

    def start(self) -> MemoryMeter:
        """Take a first reading and start the sampling thread (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return self
            if self.kind == "cuda":
                self._init_torch()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgezo-memory-meter", daemon=True)
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take a last reading, so the tail of the run is counted."""
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join()
        self._thread = None
        self.sample()

    def __enter__(self) -> MemoryMeter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    # ------------------------------------------------------------------ sampling

    @property
    def current_phase(self) -> str:
        with self._lock:
            return self._stack[-1] if self._stack else NO_PHASE

    def sample(self) -> None:
        """Take one reading now (cheap; the trainer may call it, e.g. right after a forward)."""
        with self._lock:
            phase = self._stack[-1] if self._stack else NO_PHASE
            self._take(phase, phase)

    @contextmanager
    def phase(self, name: str) -> Iterator[MemoryMeter]:
        """Account the enclosed work to phase ``name``; a reading is taken on entry and exit."""
        if not name:
            raise ValueError("phase name must be non-empty")
        with self._lock:
            before = self._stack[-1] if self._stack else NO_PHASE
            self._stack.append(name)
            self._take(before, name)
        try:
            yield self
        finally:
            with self._lock:
                self._stack.pop()
                self._take(name, self._stack[-1] if self._stack else NO_PHASE)

    def _take(self, before: str, after: str) -> None:
        """Read all sources and account the reading; never raises (caller holds the lock)."""
        try:
            now = self._clock()
            if self._t0 is None:
                self._t0 = now
            self._record(now - self._t0, self._read(), before, after)
        except Exception as exc:  # the meter must never take the trainer down
            self._error("meter", exc)

    def _record(self, t: float, reading: Reading, before: str, after: str) -> None:
        """Account ``reading`` taken at ``t``, at which the innermost phase went ``before`` -> ``after``.

        The interval ending at ``t`` belongs to ``before`` (its peak too); at a change the
        reading also opens ``after``'s new segment, with its level only.
        """
        self._samples += 1
        self._last_t = t
        for source, (level, peak) in reading.items():
            self._overall.setdefault(source, Accumulator()).add(t, level, peak)
        if before:
            stats = self._phases.setdefault(before, _PhaseStats())
            stats.samples += 1
            stats.duration += t - self._phase_since
            for source, (level, peak) in reading.items():
                stats.acc(source).add(t, level, peak)
        self._phase_since = t
        if after != before:
            if before:
                self._phases[before].pause()
            if after:
                stats = self._phases.setdefault(after, _PhaseStats())
                stats.samples += 1
                for source, (level, _peak) in reading.items():
                    stats.acc(source).add(t, level)
        primary = self._first_present(reading)
        if primary is not None:
            self._timeline.add(t, after, reading[primary][0])
            if self._on_reading is not None:
                self._on_reading(after, reading[primary][0], primary)

    def _error(self, source: str, exc: BaseException) -> None:
        self._error_count += 1
        if len(self._errors) < MAX_ERRORS_KEPT:
            self._errors.append(f"{source}: {type(exc).__name__}: {exc}")

    def _read(self) -> Reading:
        """One reading of every source this meter measures; a failing source is left out."""
        reading: Reading = {}
        try:
            reading["rss"] = self._rss.read()
        except Exception as exc:
            self._error("rss", exc)
        if self.kind == "cuda":
            try:
                reading.update(self._read_torch())
            except Exception as exc:
                self._error("torch", exc)
            try:
                used = self._read_nvml()
                if used is not None:
                    reading["nvml_process"] = (used, used)
            except Exception as exc:
                self._error("nvml_process", exc)
        return reading

    def _init_torch(self) -> None:
        try:
            import torch  # a CUDA worker has imported it already; this is a dict lookup

            self._torch = torch
            if self._cuda_index is None:
                initialized = torch.cuda.is_available() and torch.cuda.is_initialized()
                self._cuda_index = torch.cuda.current_device() if initialized else 0
        except Exception as exc:
            self._error("torch", exc)

    def _read_torch(self) -> Reading:
        torch = self._torch
        if torch is None or not torch.cuda.is_available():
            return {}
        if not torch.cuda.is_initialized():
            return {"torch_allocated": (0, 0), "torch_reserved": (0, 0)}  # no CUDA use yet
        cuda, index = torch.cuda, self._cuda_index or 0
        allocated = (int(cuda.memory_allocated(index)), int(cuda.max_memory_allocated(index)))
        reserved = (int(cuda.memory_reserved(index)), int(cuda.max_memory_reserved(index)))
        cuda.reset_peak_memory_stats(index)  # so the next peak covers the next interval only
        return {"torch_allocated": allocated, "torch_reserved": reserved}

    def _read_nvml(self) -> int | None:
        if not nvml.available():
            return None
        if not self._nvml_resolved:
            torch = self._torch
            if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
                return None  # no CUDA context yet, so NVML has nothing for us
            self._nvml_index = self._resolve_nvml_index()
            self._nvml_resolved = True
        if self._nvml_index is None:
            return None
        pid = os.getpid()
        return nvml.process_memory([pid], self._nvml_index).get(pid)

    def _resolve_nvml_index(self) -> int | None:
        """NVML's index for our CUDA device: by PCI address, else through CUDA_VISIBLE_DEVICES."""
        index = self._cuda_index or 0
        props = self._torch.cuda.get_device_properties(index)
        pci = [getattr(props, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]
        if None not in pci:
            found = nvml.index_for_pci(*pci)
            if found is not None:
                return found
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return index
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        try:
            return int(entries[index])
        except (IndexError, ValueError):  # UUIDs or MIG names: no safe guess
            return None

    # ------------------------------------------------------------------ results

    def _order(self) -> tuple[str, ...]:
        return CUDA_PRIMARY_ORDER if self.kind == "cuda" else ("rss",)

    def _first_present(self, measured: Container[str]) -> str | None:
        """The best primary-source candidate among ``measured`` source names."""
        return next((s for s in self._order() if s in measured), None)

    def primary_source(self) -> str:
        """The source behind the headline figures: nvml_process > torch_reserved > rss."""
        with self._lock:
            return self._first_present(self._overall) or "rss"

    def timeline(self) -> list[tuple[float, str, int]]:
        """(seconds since the first reading, innermost phase or "", primary-source bytes).

        The primary source is chosen per reading (on CUDA the NVML figure appears once the
        context exists). At most about ``max_timeline_points`` points; merged points keep
        their maximum, so peaks stay visible.
        """
        with self._lock:
            return list(self._timeline.points())

    def summary(self) -> dict[str, Any]:
        """The ``memory`` section of report.json (docs/architecture.md; the averaging rule is edgezo/timeweighted.py)."""
        with self._lock:
            primary = self.primary_source()
            overall = self._overall.get(primary, Accumulator())
            out: dict[str, Any] = {
                "meter": primary,
                "device": self.device,
                "peak_bytes": int(overall.peak),
                "avg_bytes": int(round(overall.avg)),
                "duration_s": round(self._last_t, 6),
                "sources": {name: acc.as_dict() for name, acc in self._overall.items()},
                "phases": {name: self._phase_summary(stats, primary) for name, stats in self._phases.items()},
            }
            note = self._note(primary)
            if note:
                out["note"] = note
            if self._error_count:
                out["errors"] = {"count": self._error_count, "first": list(self._errors)}
            return out

    def _phase_summary(self, stats: _PhaseStats, primary: str) -> dict[str, Any]:
        source = primary if primary in stats.sources else self._first_present(stats.sources)
        acc = stats.sources.get(source, Accumulator()) if source else Accumulator()
        return {
            **acc.as_dict(),
            "duration_s": round(stats.duration, 6),
            "samples": stats.samples,
            "sources": {name: a.as_dict() for name, a in stats.sources.items()},
        }

    def _note(self, primary: str) -> str | None:
        if self.kind == "cpu":
            return "no GPU: figures are this process's RSS"
        if primary == "rss":
            return "no CUDA figures were measured: figures are this process's RSS"
        if primary == "torch_reserved":
            return (
                "NVML per-process memory unavailable: figures are torch's reserved memory (no CUDA context)"
            )
        return None
