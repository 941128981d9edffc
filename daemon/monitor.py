"""Device memory sampling: what the budget is measured against.

Through `edgezo.nvml`, which picks the best source that answers:
- "nvml": a discrete GPU. The budget applies to the device's used memory (every process,
  edgezo or not); per job, the worker's per-process usage (CUDA context included).
- "jetson-meminfo": a unified-memory board. Same rule, with the device figure from /proc/meminfo.
- "system": no GPU. The "device" is system memory. The budget applies to the sum of edgezo
  workers' RSS (each worker with its children); memory outside edgezo shows up as external
  pressure through the system's available memory, which caps the headroom (see policies.admission).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from edgezo import nvml


@dataclass
class DeviceState:
    ts: float
    source: str
    name: str
    total: int
    used: int  # device used, everyone included
    free: int  # device free (system: MemAvailable)
    edgezo: int  # sum over workers
    jobs: dict[str, int] = field(default_factory=dict)  # per job, the figure the budget counts

    @property
    def usage(self) -> int:
        """What counts against the budget (see the module docstring)."""
        return self.edgezo if self.source == "system" else self.used

    @property
    def external(self) -> int:
        return max(self.used - self.edgezo, 0)


class Monitor:
    def __init__(self, index: int = 0, source: str | None = None):
        self.index = index
        self.forced = source  # "system" makes a GPU box behave like CPU-only (tests, CPU jobs)

    def sample(self, now: float, pids: dict[str, int]) -> DeviceState:
        dev = _system() if self.forced == "system" else nvml.device_memory(self.index)
        source = dev.source
        if source == "nvml":
            per_pid = nvml.process_memory(list(pids.values()), self.index)
            jobs = {job: per_pid.get(pid, 0) for job, pid in pids.items()}
        else:
            jobs = {job: nvml.rss_bytes(pid, children=True) for job, pid in pids.items()}
        return DeviceState(
            ts=now,
            source=source,
            name=dev.name,
            total=dev.total_bytes,
            used=dev.used_bytes,
            free=dev.free_bytes,
            edgezo=sum(jobs.values()),
            jobs=jobs,
        )


def _system():
    import psutil

    vm = psutil.virtual_memory()
    return nvml.DeviceMemory(0, os.uname().nodename, vm.total, vm.total - vm.available, vm.available, "system")
