"""The memory meter: time-weighted averages, per-phase peaks, report format."""

from __future__ import annotations

import time

import pytest

from edgezo.memory import Accumulator, MemoryMeter, format_bytes


def test_time_weighted_average_holds_each_value_until_the_next_sample():
    acc = Accumulator()
    acc.add(0.0, 100)
    acc.add(1.0, 300)  # 100 held for 1 s
    acc.add(4.0, 300)  # 300 held for 3 s
    assert acc.peak == 300
    assert acc.average == (100 * 1 + 300 * 3) // 4
    acc.cut()
    acc.add(10.0, 1000)  # after a cut the gap does not count
    acc.add(11.0, 0)
    assert acc.duration == pytest.approx(5.0)
    assert acc.average == (100 + 900 + 1000) // 5


def test_peak_reported_between_samples_counts():
    acc = Accumulator()
    acc.add(0.0, 10, peak=50)
    assert acc.peak == 50


def test_a_phase_that_allocates_shows_a_higher_peak():
    meter = MemoryMeter(interval=0.02).start()
    with meter.phase("zo_step"):
        time.sleep(0.1)
    with meter.phase("eval"):
        blob = bytearray(200 * 2**20)  # 200 MiB, touched so it is resident
        for i in range(0, len(blob), 4096):
            blob[i] = 1
        time.sleep(0.1)
        del blob
    meter.stop()
    s = meter.summary()
    assert s["meter"] == "rss" and "no GPU" in s["note"]
    zo, ev = s["phases"]["zo_step"], s["phases"]["eval"]
    assert ev["peak_bytes"] - zo["peak_bytes"] > 150 * 2**20
    assert zo["peak_bytes"] >= zo["avg_bytes"] > 0
    assert s["peak_bytes"] >= ev["peak_bytes"] and s["duration_s"] > 0.15
    assert ev["samples"] >= 2 and {"rss"} <= set(ev["sources"])


def test_phases_nest_and_the_inner_one_wins():
    meter = MemoryMeter(interval=1.0).start()
    with meter.phase("zo_step"):
        with meter.phase("projection"):
            assert meter.current_phase == "projection"
        assert meter.current_phase == "zo_step"
    meter.stop()
    assert {"zo_step", "projection"} <= set(meter.summary()["phases"])
    assert meter.timeline()


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
