"""The seed-log format: checksummed frames, torn tails dropped with a warning."""

from __future__ import annotations

import pytest

from edgezo import seedlog


def _write(path, n=5):
    w = seedlog.SeedLogWriter.create(path, {"spec_hash": "abc", "base_model_hash": "def", "dtype": "fp32"})
    for i in range(n):
        w.append(seedlog.STEP, {"step": i, "seeds": [i * 7], "grads": [0.1 * i + 1e-17], "lr": 1e-5, "wd": 0.0})
    w.close()


def test_roundtrip_keeps_floats_exact(tmp_path):
    path = tmp_path / "log.ezl"
    _write(path)
    header, frames = seedlog.read(path)
    assert header["format"] == seedlog.FORMAT_VERSION and header["spec_hash"] == "abc"
    steps = list(seedlog.body(frames, seedlog.STEP))
    assert [s["step"] for s in steps] == list(range(5))
    assert steps[3]["grads"][0] == 0.1 * 3 + 1e-17


@pytest.mark.parametrize("cut", [1, 3, 7, 12])
def test_torn_last_record_is_dropped_with_a_warning(tmp_path, cut):
    path = tmp_path / "log.ezl"
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # power loss in the middle of the last frame
    with pytest.warns(seedlog.TornRecordWarning):
        _, frames = seedlog.read(path)
    assert [s["step"] for s in seedlog.body(frames, seedlog.STEP)] == [0, 1, 2, 3]


def test_corrupt_byte_in_last_record_fails_its_crc(tmp_path):
    path = tmp_path / "log.ezl"
    _write(path)
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(seedlog.TornRecordWarning):
        _, frames = seedlog.read(path)
    assert len(list(seedlog.body(frames, seedlog.STEP))) == 4


def test_reopen_truncates_the_torn_tail_before_appending(tmp_path):
    path = tmp_path / "log.ezl"
    _write(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.warns(seedlog.TornRecordWarning):
        w = seedlog.SeedLogWriter.reopen(path)
    w.append(seedlog.STEP, {"step": 4, "seeds": [1], "grads": [2.0], "lr": 1e-5, "wd": 0.0})
    w.close()
    _, frames = seedlog.read(path)  # no warning now: the file is whole again
    assert [s["step"] for s in seedlog.body(frames, seedlog.STEP)] == [0, 1, 2, 3, 4]


def test_not_a_seedlog(tmp_path):
    p = tmp_path / "x.ezl"
    p.write_bytes(b"hello")
    with pytest.raises(seedlog.SeedLogError, match="bad magic"):
        seedlog.read(p)


@pytest.mark.parametrize("where", ["payload", "length"])
def test_a_damaged_frame_in_the_middle_is_corruption_and_nothing_is_dropped(tmp_path, where):
    """It used to be taken for a torn tail: every later step was discarded with only a warning, and a
    reopen truncated them away (issue 12, item 8)."""
    path = tmp_path / "log.ezl"
    _write(path)
    _, frames = seedlog.read(path)
    third = frames[2].offset  # step 2 of 0..4
    data = bytearray(path.read_bytes())
    data[third + (10 if where == "payload" else 2)] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(seedlog.SeedLogError, match=f"frame at offset {third} is damaged but intact frames follow"):
        seedlog.read(path)
    with pytest.raises(seedlog.SeedLogError, match=f"truncate -s {third} "):
        seedlog.SeedLogWriter.reopen(path)
    assert path.read_bytes() == bytes(data)  # kept for inspection, byte for byte
