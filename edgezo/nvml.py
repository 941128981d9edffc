"""A thin, forgiving layer over NVML, in the style of nvitop's ``libnvml``.

Both the daemon (which never imports torch) and the workers read device memory through
this module, so it imports neither torch nor anything heavy, and nothing here raises
because NVML is missing: without a driver the answers degrade to the OS's view.

Sources, best first (``DeviceMemory.source``):

* ``"nvml"`` — NVML memory info of a discrete GPU (``nvmlDeviceGetMemoryInfo``, v2 struct
  when the bindings and driver have it, else v1).
* ``"jetson-meminfo"`` — unified-memory boards (Jetson), where NVML is absent or answers
  NOT_SUPPORTED for memory: ``/proc/meminfo``, with ``NvMapMemUsed`` (what the GPU side
  holds) as the used figure when the kernel exports it.
* ``"system"`` — no GPU at all: the "device" is system memory (``psutil.virtual_memory``).

The ``pynvml`` module (PyPI ``nvidia-ml-py``) names versioned functions and structs
differently across releases, so every versioned call is looked up with ``getattr`` and
falls back on ``FUNCTION_NOT_FOUND`` / ``NOT_SUPPORTED``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "DeviceMemory",
    "available",
    "backend",
    "device_count",
    "device_memory",
    "index_for_pci",
    "meminfo_device_memory",
    "parse_meminfo",
    "process_memory",
    "rss_bytes",
]

NVML = "nvml"
JETSON = "jetson-meminfo"
SYSTEM = "system"

# NVML return codes (stable across releases; a fake module in tests need not define them).
_ERROR_NOT_SUPPORTED = 3
_ERROR_FUNCTION_NOT_FOUND = 13
_FALLBACK_ERRORS = (_ERROR_NOT_SUPPORTED, _ERROR_FUNCTION_NOT_FOUND)
_NOT_AVAILABLE_ULL = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long

MEMINFO_PATH = Path("/proc/meminfo")
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
_DT_MODEL = Path("/proc/device-tree/model")


@dataclass(frozen=True)
class DeviceMemory:
    """One reading of a device's memory, and where it came from."""

    index: int
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    source: str  # "nvml" | "jetson-meminfo" | "system"


# --------------------------------------------------------------------------- NVML loading

_lock = threading.Lock()
# None: not tried yet; False: tried and unavailable; otherwise the initialised pynvml module.
_state: Any = None


def _nvml() -> Any | None:
    """The initialised pynvml module, or None; nvmlInit runs at most once per process."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    _state = pynvml
                except Exception:  # no bindings, no libnvidia-ml.so, no driver, ...
                    _state = False
    return _state or None


def available() -> bool:
    """Whether NVML can be queried here (a driver and the library exist). Never raises."""
    return _nvml() is not None


def _error_code(mod: Any, exc: BaseException) -> int | None:
    """The NVML return code carried by ``exc``, or None if it is not an NVML error."""
    nvml_error = getattr(mod, "NVMLError", None)
    if isinstance(nvml_error, type) and isinstance(exc, nvml_error):
        return getattr(exc, "value", None)
    return None


def _is_fallback_error(mod: Any, exc: BaseException) -> bool:
    """True for the errors that mean "try an older API version" rather than "give up"."""
    mismatch = getattr(mod, "NVMLLibraryMismatchError", None)
    if isinstance(mismatch, type) and isinstance(exc, mismatch):
        return True  # an unversioned call whose symbol the driver lacks
    return _error_code(mod, exc) in _FALLBACK_ERRORS


def _decode(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def device_count() -> int:
    """How many GPUs NVML sees (0 without NVML)."""
    mod = _nvml()
    if mod is None:
        return 0
    try:
        return int(mod.nvmlDeviceGetCount())
    except Exception:
        return 0


def index_for_pci(domain: int, bus: int, device: int) -> int | None:
    """NVML index of the GPU at a PCI address.

    CUDA's device order (and CUDA_VISIBLE_DEVICES) need not match NVML's, so a worker maps
    its ``torch.cuda`` device to NVML by PCI address rather than trusting the index.
    """
    mod = _nvml()
    if mod is None:
        return None
    for index in range(device_count()):
        try:
            pci = mod.nvmlDeviceGetPciInfo(mod.nvmlDeviceGetHandleByIndex(index))
        except Exception:
            continue
        if (pci.domain, pci.bus, pci.device) == (domain, bus, device):
            return index
    return None


# --------------------------------------------------------------------------- /proc/meminfo


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo text into bytes per field (``kB`` values are scaled; counts kept)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1].lower() == "kb":
            value *= 1024
        fields[key.strip()] = value
    return fields


def meminfo_device_memory(text: str, index: int = 0, name: str = "unified memory") -> DeviceMemory:
    """The unified-memory device reading for /proc/meminfo ``text`` (pure; see module doc).

    ``used_bytes`` is ``NvMapMemUsed`` when present (the GPU's share of the pool), else
    ``MemTotal - MemAvailable``. ``free_bytes`` is always ``MemAvailable``: the pool is
    shared with the CPU, so headroom must come from ``free_bytes``, not ``total - used``.
    """
    info = parse_meminfo(text)
    total = info.get("MemTotal", 0)
    available_ = info.get("MemAvailable", info.get("MemFree", 0))
    used = info.get("NvMapMemUsed", total - available_)
    return DeviceMemory(index, name, total, max(used, 0), max(available_, 0), JETSON)


def _is_unified_board(meminfo_text: str) -> bool:
    return "NvMapMemUsed" in meminfo_text or _TEGRA_RELEASE.exists()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _board_name() -> str:
    model = _read_text(_DT_MODEL)
    return model.strip("\x00\n ") if model else "unified memory"


def _meminfo_reading(index: int, force: bool) -> DeviceMemory | None:
    """The /proc/meminfo reading, if this is a unified-memory board (or ``force``)."""
    text = _read_text(MEMINFO_PATH)
    if text is None or not (force or _is_unified_board(text)):
        return None
    return meminfo_device_memory(text, index, _board_name())


def _system_reading(index: int) -> DeviceMemory:
    vm = psutil.virtual_memory()
    return DeviceMemory(
        index, "system memory", int(vm.total), int(vm.total - vm.available), int(vm.available), SYSTEM
    )


# --------------------------------------------------------------------------- device memory


class _Unsupported(Exception):
    """NVML is there, but cannot report memory for this device (unified-memory boards)."""


def _nvml_reading(mod: Any, index: int) -> DeviceMemory:
    handle = mod.nvmlDeviceGetHandleByIndex(index)
    info = None
    version = getattr(mod, "nvmlMemory_v2", None)
    if version is not None:
        try:  # v2 separates driver-reserved memory from "used"
            info = mod.nvmlDeviceGetMemoryInfo(handle, version=version)
        except Exception:  # bindings without ``version``, drivers without _v2, ...: try v1
            info = None
    if info is None:
        try:
            info = mod.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:
            if _error_code(mod, exc) == _ERROR_NOT_SUPPORTED:
                raise _Unsupported from exc
            raise
    try:
        name = _decode(mod.nvmlDeviceGetName(handle))
    except Exception:
        name = f"GPU {index}"
    return DeviceMemory(index, name, int(info.total), int(info.used), int(info.free), NVML)


def device_memory(index: int = 0) -> DeviceMemory:
    """Memory of device ``index`` from the best source that answers. Never raises.

    Any NVML failure (a lost GPU, an index NVML does not know) falls through to the next
    source; ``source`` says which one answered, so callers can tell.
    """
    mod = _nvml()
    unsupported = False
    if mod is not None:
        try:
            return _nvml_reading(mod, index)
        except _Unsupported:
            unsupported = True
        except Exception:
            pass
    try:
        reading = _meminfo_reading(index, force=unsupported)
    except Exception:
        reading = None
    return reading if reading is not None else _system_reading(index)


def backend() -> str:
    """Which source ``device_memory(0)`` uses here: "nvml", "jetson-meminfo" or "system"."""
    return device_memory(0).source


# --------------------------------------------------------------------------- per process


class _ProcessInfoV1(ctypes.Structure):
    """``nvmlProcessInfo_v1_t``: what drivers before the _v2 symbols fill in."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


def _processes_v1_raw(mod: Any, handle: Any) -> list[Any]:
    """Call the unversioned C symbol with the v1 struct (newer bindings only wrap v2/v3).

    ``pointer`` rather than ``byref`` so a test double can write the count back.
    """
    get_fn = mod._nvmlGetFunctionPointer
    success = getattr(mod, "NVML_SUCCESS", 0)
    insufficient = getattr(mod, "NVML_ERROR_INSUFFICIENT_SIZE", 7)
    fn = get_fn("nvmlDeviceGetComputeRunningProcesses")
    count = ctypes.c_uint(0)
    ret = fn(handle, ctypes.pointer(count), None)
    if ret == success:
        return []
    if ret != insufficient:
        raise mod.NVMLError(ret)
    count.value = count.value * 2 + 5  # room for processes started in between
    procs = (_ProcessInfoV1 * count.value)()
    ret = fn(handle, ctypes.pointer(count), procs)
    if ret != success:
        raise mod.NVMLError(ret)
    return [procs[i] for i in range(count.value)]


def _process_queries(mod: Any) -> list[Any]:
    """The compute-process queries to try on ``mod``, newest first (v3 -> v2 -> v1)."""
    queries = [getattr(mod, f"nvmlDeviceGetComputeRunningProcesses_{v}", None) for v in ("v3", "v2")]
    queries = [q for q in queries if q is not None]
    if not queries:  # old bindings: the unversioned wrapper is the v1 call
        unversioned = getattr(mod, "nvmlDeviceGetComputeRunningProcesses", None)
        if unversioned is not None:
            queries.append(unversioned)
    elif hasattr(mod, "_nvmlGetFunctionPointer"):
        queries.append(lambda handle: _processes_v1_raw(mod, handle))
    return queries


def _running_processes(mod: Any, handle: Any) -> list[Any]:
    for query in _process_queries(mod):
        try:
            return list(query(handle))
        except Exception as exc:
            if not _is_fallback_error(mod, exc):
                raise
    return []


def process_memory(pids: Iterable[int] | None = None, index: int = 0) -> dict[int, int]:
    """Device memory used per process on GPU ``index`` (CUDA context included), by pid.

    Only ``pids`` when given. Processes whose usage NVML cannot report (WDDM, some
    containers) are left out, as is everything when NVML is missing: then ``{}``.
    NVML reports host pids, so a worker in its own pid namespace will not find itself.
    """
    mod = _nvml()
    if mod is None:
        return {}
    wanted = None if pids is None else set(pids)
    try:
        procs = _running_processes(mod, mod.nvmlDeviceGetHandleByIndex(index))
    except Exception:
        return {}
    usage: dict[int, int] = {}
    for proc in procs:
        pid, used = int(getattr(proc, "pid", -1)), getattr(proc, "usedGpuMemory", None)
        if used is None or used == _NOT_AVAILABLE_ULL or (wanted is not None and pid not in wanted):
            continue
        usage[pid] = usage.get(pid, 0) + int(used)  # a pid can appear once per MIG instance
    return usage


def rss_bytes(pid: int | None = None, children: bool = False) -> int:
    """Resident set size of ``pid`` (default: this process), plus its descendants if asked.

    0 when the process is gone: callers sample processes that may exit at any time.
    """
    try:
        proc = psutil.Process(os.getpid() if pid is None else pid)
        total = proc.memory_info().rss
        family = proc.children(recursive=True) if children else []
    except (psutil.Error, OSError):
        return 0
    for child in family:
        try:
            total += child.memory_info().rss
        except (psutil.Error, OSError):
            continue  # exited while we walked the tree
    return int(total)
