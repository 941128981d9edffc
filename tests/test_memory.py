"""edgezo.memory on CPU: the pure accumulator, phase attribution, and real RSS metering."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgezo.memory import Accumulator, MemoryLog, MemoryMeter, read_memory_log
from policies.memory import fmt_bytes

MIB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scripted_meter(values: dict[str, tuple[int, int]] | None = None) -> tuple[MemoryMeter, FakeClock, dict]:
    """A meter whose readings and clock the test sets; no thread is started."""
    clock = FakeClock()
    meter = MemoryMeter(interval=60, clock=clock)
    current = {"rss": (0, 0)} if values is None else values
    meter._read = lambda: dict(current)  # type: ignore[method-assign]
    return meter, clock, current


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1.00 KiB"),
        (1.5 * MIB, "1.50 MiB"),
        (1.23 * 2**30, "1.23 GiB"),
        (-2048, "-2.00 KiB"),
        (3 * 2**40, "3.00 TiB"),
    ],
)
def test_format_bytes(n, text):
    assert fmt_bytes(n, 2) == text


def test_importing_memory_does_not_import_torch():
    code = "import sys, edgezo.memory; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_device_is_rejected():
    with pytest.raises(ValueError):
        MemoryMeter("tpu")


# --------------------------------------------------------------------------- Accumulator


def test_accumulator_trapezoid_average():
    acc = Accumulator()
    for t, v in [(0.0, 0), (1.0, 10), (3.0, 10)]:
        acc.add(t, v)
    # (0+10)/2*1 + (10+10)/2*2 = 25 byte-seconds over 3 s
    assert acc.avg == pytest.approx(25 / 3)
    assert (acc.peak, acc.min, acc.samples, acc.duration) == (10, 0, 3, 3.0)
    assert acc.as_dict() == {"peak_bytes": 10, "avg_bytes": 8}


def test_accumulator_interval_peak_counts_for_peak_not_average():
    acc = Accumulator()
    acc.add(0.0, 4)
    acc.add(2.0, 4, peak=50)  # a spike between the two readings
    assert acc.peak == 50
    assert acc.avg == 4


def test_accumulator_pause_skips_the_gap():
    acc = Accumulator()
    acc.add(0.0, 10)
    acc.add(1.0, 10)
    acc.pause()
    acc.add(5.0, 100)  # 4 s elsewhere are not integrated
    acc.add(6.0, 100)
    assert acc.duration == 2.0
    assert acc.avg == pytest.approx(55)


def test_accumulator_degenerate_cases():
    assert Accumulator().avg == 0 and Accumulator().as_dict() == {"peak_bytes": 0, "avg_bytes": 0}
    one = Accumulator()
    one.add(3.0, 7)
    assert one.avg == 7 and one.duration == 0


def test_accumulator_average_between_min_and_peak():
    import random

    rng = random.Random(0)
    acc, t = Accumulator(), 0.0
    for _ in range(500):
        t += rng.uniform(0.001, 0.5)
        acc.add(t, rng.randrange(0, 10**9))
    assert acc.min <= acc.avg <= acc.peak


# --------------------------------------------------------------------------- phase attribution


def test_phases_nest_and_boundaries_are_shared():
    meter, clock, current = scripted_meter()
    meter.sample()  # t=0, no phase
    with meter.phase("zo_step"):  # t=0
        clock.now += 1
        current["rss"] = (10, 10)
        meter.sample()  # t=1
        clock.now += 1
        current["rss"] = (20, 90)  # peak 90 happened while zo_step ran
        with meter.phase("projection"):  # t=2: closes zo_step's segment, opens projection's
            assert meter.current_phase == "projection"
            clock.now += 2
            current["rss"] = (40, 40)
        # t=4: projection ends, zo_step resumes
        assert meter.current_phase == "zo_step"
        clock.now += 1
        current["rss"] = (20, 20)
    # t=5
    assert meter.current_phase == ""

    s = meter.summary()
    zo, proj = s["phases"]["zo_step"], s["phases"]["projection"]
    assert zo["duration_s"] == pytest.approx(3.0)  # 0-2 and 4-5: the inner phase's time is not counted
    assert proj["duration_s"] == pytest.approx(2.0)
    assert zo["peak_bytes"] == 90  # the interval peak lands in the phase that was running
    assert proj["peak_bytes"] == 40
    # zo_step: segment 0->1->2 (0,10,20) then 4->5 (40,20): (5 + 15 + 30) / 3 s
    assert zo["avg_bytes"] == round(50 / 3)
    assert proj["avg_bytes"] == 30  # (20 + 40) / 2
    assert proj["samples"] == 2 and zo["samples"] == 5
    assert s["duration_s"] == pytest.approx(5.0)
    assert s["peak_bytes"] == 90
    assert [p for _, p, _ in meter.timeline()] == ["", "zo_step", "zo_step", "projection", "zo_step", ""]


def test_phase_reentered_does_not_integrate_the_gap():
    meter, clock, current = scripted_meter()
    for level in (10, 1000):
        with meter.phase("eval"):
            current["rss"] = (level, level)
            meter.sample()
            clock.now += 1
        clock.now += 100  # a long time outside eval
    ev = meter.summary()["phases"]["eval"]
    assert ev["duration_s"] == pytest.approx(2.0)
    assert ev["avg_bytes"] == 505  # 1 s at 10, 1 s at 1000; the 100 s gaps are not eval's


def test_timeline_is_bounded_and_keeps_the_spike():
    clock = FakeClock()
    meter = MemoryMeter(interval=60, max_timeline_points=100, clock=clock)
    level = {"v": 1}
    meter._read = lambda: {"rss": (level["v"], level["v"])}  # type: ignore[method-assign]
    for i in range(10_000):
        level["v"] = 10**9 if i == 7777 else 1000 + i % 7
        clock.now += 0.1
        meter.sample()
    points = meter.timeline()
    assert 50 <= len(points) <= 101
    assert max(v for _, _, v in points) == 10**9
    assert [t for t, _, _ in points] == sorted(t for t, _, _ in points)


def test_sampling_errors_never_reach_the_trainer():
    meter = MemoryMeter(interval=0.005)

    def broken():
        raise RuntimeError("psutil went away")

    meter._rss.read = broken  # type: ignore[method-assign]
    with meter, meter.phase("eval"):
        time.sleep(0.05)
    s = meter.summary()
    assert s["errors"]["count"] >= 3
    assert "psutil went away" in s["errors"]["first"][0]
    assert s["sources"] == {}


# --------------------------------------------------------------------------- real RSS on CPU


def _in_a_fresh_process(fn) -> None:
    """Run `fn` (a module-level function that asserts) in a new interpreter: RSS peaks are
    process-wide, and what earlier tests left in this process (freed but resident heap, maps)
    can hide an allocation from them."""
    root = Path(__file__).resolve().parent.parent
    code = f"import sys; sys.path.insert(0, {str(root)!r}); from tests.test_memory import {fn.__name__}; {fn.__name__}()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode == 77:
        pytest.skip("kernel peak-RSS reset (/proc/self/clear_refs) unavailable")
    assert r.returncode == 0, r.stderr[-3000:]


def _eval_allocation_body() -> None:
    size = 256 * MIB
    with MemoryMeter("cpu", interval=0.01) as meter:
        with meter.phase("zo_step"):
            time.sleep(0.05)
        with meter.phase("eval"):
            buf = b"\x01" * size  # written, so resident
            time.sleep(0.05)
            del buf
        with meter.phase("zo_step"):
            time.sleep(0.05)
    s = meter.summary()
    eval_peak, zo_peak = s["phases"]["eval"]["peak_bytes"], s["phases"]["zo_step"]["peak_bytes"]
    assert 0.8 * size <= eval_peak - zo_peak <= 1.3 * size, (eval_peak, zo_peak)
    for phase in s["phases"].values():
        assert 0 < phase["avg_bytes"] <= phase["peak_bytes"]
    rss = meter._overall["rss"]
    assert rss.min <= s["avg_bytes"] <= s["peak_bytes"] == rss.peak


def test_allocation_inside_eval_raises_its_peak_by_the_allocation():
    _in_a_fresh_process(_eval_allocation_body)


def _short_spike_body() -> None:
    meter = MemoryMeter("cpu", interval=3600)  # the thread never fires: only phase boundaries sample
    if not meter._rss.tracks_peak:
        sys.exit(77)
    with meter:
        with meter.phase("zo_step"):
            pass
        with meter.phase("export"):
            buf = b"\x01" * (128 * MIB)
            del buf  # freed before the exit reading
    phases = meter.summary()["phases"]
    assert phases["export"]["peak_bytes"] - phases["zo_step"]["peak_bytes"] >= 0.8 * 128 * MIB, phases


def test_short_spike_between_samples_is_caught():
    _in_a_fresh_process(_short_spike_body)


def test_summary_format_on_cpu():
    with MemoryMeter() as meter:
        with meter.phase("load"):
            meter.sample()
    s = meter.summary()
    assert set(s) == {"meter", "device", "peak_bytes", "avg_bytes", "duration_s", "sources", "phases", "note"}
    assert (s["meter"], s["device"]) == ("rss", "cpu")
    assert s["note"] == "no GPU: figures are this process's RSS"
    assert set(s["sources"]) == {"rss"}
    assert set(s["sources"]["rss"]) == {"peak_bytes", "avg_bytes"}
    load = s["phases"]["load"]
    assert set(load) == {"peak_bytes", "avg_bytes", "duration_s", "samples", "sources"}
    assert load["samples"] >= 3 and set(load["sources"]) == {"rss"}
    assert isinstance(s["peak_bytes"], int) and isinstance(s["duration_s"], float)


def test_concurrent_sampling_is_safe():
    with MemoryMeter(interval=0.001) as meter:

        def trainer(name: str) -> None:
            for _ in range(200):
                with meter.phase(name):
                    meter.sample()

        threads = [threading.Thread(target=trainer, args=("zo_step",)) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    s = meter.summary()
    assert "errors" not in s
    assert s["phases"]["zo_step"]["samples"] >= 400


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_meter_sees_allocation():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from edgezo import nvml

    size = 512 * MIB
    with MemoryMeter("cuda:0", interval=0.01) as meter:
        torch.zeros(1, device="cuda:0")  # create the context
        with meter.phase("zo_step"):
            time.sleep(0.03)
        with meter.phase("eval"):
            x = torch.empty(size, dtype=torch.uint8, device="cuda:0")
            del x  # freed before the exit reading: only the interval peak sees it
        torch.cuda.synchronize()
    s = meter.summary()
    assert s["device"] == "cuda:0"
    assert {"rss", "torch_allocated", "torch_reserved"} <= set(s["sources"])
    ev, zo = s["phases"]["eval"]["sources"], s["phases"]["zo_step"]["sources"]
    assert ev["torch_allocated"]["peak_bytes"] - zo["torch_allocated"]["peak_bytes"] >= size
    if nvml.available() and "nvml_process" in s["sources"]:
        assert s["meter"] == "nvml_process"
        assert s["sources"]["nvml_process"]["peak_bytes"] > 0  # includes the CUDA context
    else:
        assert s["meter"] == "torch_reserved"


def test_memory_log_writes_at_a_bounded_rate_and_at_each_phase_change(tmp_path):
    now = [1000.0]
    log = MemoryLog(tmp_path / "memory.jsonl", every=1.0, clock=lambda: now[0])
    for i in range(100):  # 10 s of readings every 0.1 s; eval from 5 s to 6 s; between steps no phase
        now[0] = 1000.0 + i / 10
        phase = "eval" if 50 <= i < 60 else ("" if i % 2 else "zo_step")
        log.add(phase, 100 + i + (1000 if i == 33 else 0), "rss")
    rows = read_memory_log(tmp_path)
    assert 10 <= len(rows) <= 14  # about one a second, plus the two changes
    assert [r["phase"] for r in rows].count("eval") >= 1 and "" not in [r["phase"] for r in rows]
    assert max(r["bytes"] for r in rows) == 1133  # a spike between two lines is kept
    (tmp_path / "memory.jsonl").open("a").write('{"t": 1, "pha')  # a torn last line is skipped
    assert len(read_memory_log(tmp_path)) == len(rows)
