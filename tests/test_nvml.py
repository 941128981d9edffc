"""edgezo.nvml without a GPU: fake pynvml modules exercise the version fallbacks."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from edgezo import nvml

NOT_SUPPORTED, FUNCTION_NOT_FOUND, NO_PERMISSION = 3, 13, 4

JETSON_MEMINFO = """\
MemTotal:        7765468 kB
MemFree:         2337052 kB
MemAvailable:    4807396 kB
Buffers:           84332 kB
Cached:          2435208 kB
SwapTotal:       3882720 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
NvMapMemFree:      47104 kB
NvMapMemUsed:     963468 kB
"""

DESKTOP_MEMINFO = """\
MemTotal:       16303476 kB
MemFree:         9000000 kB
MemAvailable:   12000000 kB
HugePages_Total:       0
"""

KIB = 1024


class FakeError(Exception):
    """Stands in for pynvml.NVMLError: an exception carrying an NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


def proc(pid: int, used: int | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used)


def fail(code: int):
    def raiser(*args, **kwargs):
        raise FakeError(code)

    return raiser


def fake_module(**functions) -> types.SimpleNamespace:
    """A pynvml look-alike with one GPU; ``functions`` adds or overrides attributes."""
    base = {
        "NVMLError": FakeError,
        "nvmlInit": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda index: f"handle{index}",
        "nvmlDeviceGetName": lambda handle: b"Fake GPU",
    }
    base.update(functions)
    return types.SimpleNamespace(**base)


@pytest.fixture
def use_module(monkeypatch):
    """Install a (fake) initialised NVML module, or False for "no NVML"."""

    def install(module) -> None:
        monkeypatch.setattr(nvml, "_state", module)

    return install


@pytest.fixture
def meminfo(tmp_path, monkeypatch):
    """Point the module at a /proc/meminfo sample and at a board that is not a Jetson."""

    def write(text: str) -> Path:
        path = tmp_path / "meminfo"
        path.write_text(text)
        monkeypatch.setattr(nvml, "MEMINFO_PATH", path)
        return path

    monkeypatch.setattr(nvml, "_TEGRA_RELEASE", tmp_path / "no-tegra-release")
    monkeypatch.setattr(nvml, "_DT_MODEL", tmp_path / "no-model")
    return write


# --------------------------------------------------------------------------- /proc/meminfo


def test_parse_meminfo_scales_kb_and_keeps_counts():
    info = nvml.parse_meminfo(JETSON_MEMINFO + "garbage line\nBad: x kB\n")
    assert info["MemTotal"] == 7765468 * KIB
    assert info["NvMapMemUsed"] == 963468 * KIB
    assert info["HugePages_Total"] == 0
    assert "Bad" not in info


def test_meminfo_reading_prefers_nvmap_used():
    reading = nvml.meminfo_device_memory(JETSON_MEMINFO, index=0, name="Jetson")
    assert reading == nvml.DeviceMemory(
        0, "Jetson", 7765468 * KIB, 963468 * KIB, 4807396 * KIB, "jetson-meminfo"
    )


def test_meminfo_reading_without_nvmap_uses_total_minus_available():
    reading = nvml.meminfo_device_memory(DESKTOP_MEMINFO)
    assert reading.used_bytes == (16303476 - 12000000) * KIB
    assert reading.free_bytes == 12000000 * KIB


# --------------------------------------------------------------------------- loading


def test_available_is_false_and_init_tried_once_without_library(monkeypatch):
    calls = []

    def broken_init():
        calls.append(1)
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=broken_init))
    monkeypatch.setattr(nvml, "_state", None)
    assert nvml.available() is False
    assert nvml.available() is False
    assert calls == [1]
    assert nvml.process_memory() == {}
    assert nvml.device_count() == 0
    assert nvml.index_for_pci(0, 1, 0) is None


def test_available_with_working_module(use_module):
    use_module(fake_module())
    assert nvml.available() is True
    assert nvml.device_count() == 1


def test_fallback_errors_recognised_on_real_bindings():
    pynvml = pytest.importorskip("pynvml")
    assert nvml._is_fallback_error(pynvml, pynvml.NVMLError_FunctionNotFound())
    assert nvml._is_fallback_error(pynvml, pynvml.NVMLError_NotSupported())
    assert nvml._is_fallback_error(pynvml, pynvml.NVMLLibraryMismatchError("old driver"))
    assert not nvml._is_fallback_error(pynvml, pynvml.NVMLError_NoPermission())
    assert not nvml._is_fallback_error(pynvml, ValueError())


def test_importing_nvml_does_not_import_torch():
    code = "import sys, edgezo.nvml; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- process memory


def test_process_memory_falls_back_from_v3_to_v2(use_module):
    calls = []

    def v2(handle):
        calls.append(handle)
        return [proc(10, 100), proc(11, None), proc(12, 2**64 - 1), proc(10, 50), proc(13, 7)]

    use_module(
        fake_module(
            nvmlDeviceGetComputeRunningProcesses_v3=fail(FUNCTION_NOT_FOUND),
            nvmlDeviceGetComputeRunningProcesses_v2=v2,
        )
    )
    assert nvml.process_memory() == {10: 150, 13: 7}  # None / NOT_AVAILABLE skipped; MIG entries summed
    assert nvml.process_memory([13, 99], index=0) == {13: 7}
    assert calls == ["handle0", "handle0"]


def test_process_memory_uses_v3_when_present(use_module):
    use_module(
        fake_module(
            nvmlDeviceGetComputeRunningProcesses_v3=lambda handle: [proc(1, 5)],
            nvmlDeviceGetComputeRunningProcesses_v2=fail(NO_PERMISSION),
        )
    )
    assert nvml.process_memory() == {1: 5}


def test_process_memory_old_bindings_call_unversioned_v1(use_module):
    use_module(fake_module(nvmlDeviceGetComputeRunningProcesses=lambda handle: [proc(3, 30)]))
    assert nvml.process_memory([3]) == {3: 30}


def test_process_memory_falls_back_to_raw_v1_symbol(use_module):
    """New bindings on a driver without _v2/_v3 symbols: the v1 struct through ctypes."""

    def c_function(handle, count_ptr, array):
        if array is None:
            count_ptr.contents.value = 2
            return 7  # NVML_ERROR_INSUFFICIENT_SIZE
        array[0].pid, array[0].usedGpuMemory = 21, 2100
        array[1].pid, array[1].usedGpuMemory = 22, 2**64 - 1
        count_ptr.contents.value = 2
        return 0

    def get_function_pointer(name):
        assert name == "nvmlDeviceGetComputeRunningProcesses"
        return c_function

    use_module(
        fake_module(
            NVML_SUCCESS=0,
            NVML_ERROR_INSUFFICIENT_SIZE=7,
            nvmlDeviceGetComputeRunningProcesses_v3=fail(FUNCTION_NOT_FOUND),
            nvmlDeviceGetComputeRunningProcesses_v2=fail(NOT_SUPPORTED),
            _nvmlGetFunctionPointer=get_function_pointer,
        )
    )
    assert nvml.process_memory() == {21: 2100}
    assert ctypes.sizeof(nvml._ProcessInfoV1) == 16


def test_process_memory_other_errors_give_empty(use_module):
    use_module(fake_module(nvmlDeviceGetComputeRunningProcesses_v3=fail(NO_PERMISSION)))
    assert nvml.process_memory() == {}
    use_module(fake_module(nvmlDeviceGetHandleByIndex=fail(2)))
    assert nvml.process_memory() == {}


# --------------------------------------------------------------------------- device memory


def memory(total: int, used: int, free: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(total=total, used=used, free=free)


def test_device_memory_uses_v2_struct(use_module):
    def get_memory_info(handle, version=None):
        return memory(100, 30, 60) if version == 0x02000028 else memory(100, 40, 60)

    use_module(fake_module(nvmlMemory_v2=0x02000028, nvmlDeviceGetMemoryInfo=get_memory_info))
    assert nvml.device_memory() == nvml.DeviceMemory(0, "Fake GPU", 100, 30, 60, "nvml")
    assert nvml.backend() == "nvml"


def test_device_memory_falls_back_to_v1(use_module):
    def get_memory_info(handle, version=None):
        if version is not None:
            raise FakeError(FUNCTION_NOT_FOUND)
        return memory(100, 40, 60)

    use_module(fake_module(nvmlMemory_v2=0x02000028, nvmlDeviceGetMemoryInfo=get_memory_info))
    assert nvml.device_memory().used_bytes == 40

    # bindings whose function takes no version argument at all
    use_module(fake_module(nvmlMemory_v2=0x02000028, nvmlDeviceGetMemoryInfo=lambda handle: memory(9, 4, 5)))
    assert nvml.device_memory().total_bytes == 9


def test_device_memory_not_supported_reads_meminfo(use_module, meminfo):
    meminfo(JETSON_MEMINFO)
    use_module(fake_module(nvmlMemory_v2=0x02000028, nvmlDeviceGetMemoryInfo=fail(NOT_SUPPORTED)))
    reading = nvml.device_memory()
    assert reading.source == "jetson-meminfo"
    assert reading.used_bytes == 963468 * KIB
    # NOT_SUPPORTED means "unified memory", even where the kernel lacks NvMap fields
    meminfo(DESKTOP_MEMINFO)
    assert nvml.backend() == "jetson-meminfo"


def test_device_memory_other_nvml_errors_degrade(use_module, meminfo):
    meminfo(DESKTOP_MEMINFO)
    use_module(fake_module(nvmlDeviceGetHandleByIndex=fail(2)))
    assert nvml.device_memory(3).source == "system"


def test_no_nvml_jetson_board_reads_meminfo(use_module, meminfo):
    meminfo(JETSON_MEMINFO)
    use_module(False)
    reading = nvml.device_memory()
    assert (reading.source, reading.name) == ("jetson-meminfo", "unified memory")


def test_no_nvml_no_jetson_is_system_memory(use_module, meminfo):
    meminfo(DESKTOP_MEMINFO)
    use_module(False)
    reading = nvml.device_memory()
    assert reading.source == "system" == nvml.backend()
    assert reading.total_bytes > 0 and reading.used_bytes + reading.free_bytes == reading.total_bytes


def test_index_for_pci(use_module):
    pci = {0: (0, 0x3B, 0), 1: (0, 0x86, 0)}
    use_module(
        fake_module(
            nvmlDeviceGetCount=lambda: 2,
            nvmlDeviceGetPciInfo=lambda handle: types.SimpleNamespace(
                **dict(zip(("domain", "bus", "device"), pci[int(handle[-1])], strict=True))
            ),
        )
    )
    assert nvml.index_for_pci(0, 0x86, 0) == 1
    assert nvml.index_for_pci(0, 0x99, 0) is None


# --------------------------------------------------------------------------- RSS


def test_rss_bytes_self_children_and_gone():
    own = nvml.rss_bytes(os.getpid())
    assert own > 0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert nvml.rss_bytes(os.getpid(), children=True) > own
    finally:
        child.kill()
        child.wait()
    assert nvml.rss_bytes(child.pid) == 0


# --------------------------------------------------------------------------- real NVML


@pytest.mark.cuda
@pytest.mark.skipif(not nvml.available(), reason="needs an NVIDIA driver")
def test_real_nvml_reports_device_memory():
    reading = nvml.device_memory(0)
    assert reading.source in ("nvml", "jetson-meminfo")
    assert reading.total_bytes > 0
