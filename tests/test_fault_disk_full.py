"""A full disk under the daemon's state directory, on a real (small) tmpfs: jobs pause with a reason
and resume when there is room, the daemon keeps serving and restarts on the full disk, and nothing it
acknowledged is lost. Needs permission to mount a tmpfs (root, as in CI); skips with the reason otherwise."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from daemon.store import DiskFull, Store
from edgezo.client import ApiError
from edgezo.testing.daemon import DaemonProc, synthetic_spec, wait_for

TOTAL = 400
SMALL = {"trainable": "lora", "snapshot_every": 0}  # a job whose expected output (5 MiB) fits the 16 MiB disk


@pytest.fixture
def small_disk():
    where = Path(tempfile.mkdtemp(prefix="ezfull", dir="/tmp"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)
    os.rmdir(where)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk refuses (ENOSPC)."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    for size in (4096, 512, 1):  # the last pages too
        with open(filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def steps_in(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()]


def test_a_full_store_refuses_a_write_cleanly_and_takes_the_next_once_there_is_room(tmp_path):
    store = Store(tmp_path / "edgezo.db")
    (pages,) = store.db.execute("PRAGMA page_count").fetchone()
    store.db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "database or disk is full"
    rows = [("job-1", float(i), 1 << 20, "zo_step") for i in range(5000)]
    with pytest.raises(DiskFull):
        store.add_samples(rows, None)
    assert not store.db.in_transaction  # a transaction left open would fail every later write
    store.db.execute(f"PRAGMA max_page_count={pages + 10_000}")
    store.add_samples(rows, None)
    assert len(store.samples("job-1")) == 5000
    store.close()


def test_full_disk_pauses_the_job_refuses_enqueue_survives_restart_and_loses_nothing(small_disk):
    d = DaemonProc(small_disk / "state", "--disk-reserve", "256KiB",
                   synthetic="step_s=0.01,heavy_every=100000,heavy_s=0.01,record_bytes=8192")
    try:
        d.start()
        job = d.enqueue(synthetic_spec("disk", steps=TOTAL, **SMALL))["id"]
        wait_for(lambda: d.job(job)["step"] >= 20, 30, what="progress")

        filler = fill(small_disk)
        paused = wait_for(lambda: (j := d.job(job))["state"] == "paused" and j, 30, what="pause on the full disk")
        assert "disk" in paused["reason"], paused["reason"]
        health = d.client().health()
        assert health["ok"]

        # nothing is acknowledged that the store could not keep
        before = len(d.client().jobs()["jobs"])
        with pytest.raises(ApiError) as refused:
            d.enqueue(synthetic_spec("more", steps=5, **SMALL))
        assert refused.value.status == 507 and "not queued" in str(refused.value), refused.value
        assert len(d.client().jobs()["jobs"]) == before
        spec_file = d.tmp / "more.json"  # on the big disk: only the state directory is full
        spec_file.write_text(json.dumps(synthetic_spec("cli", steps=5, **SMALL)))
        cli = d.cli("enqueue", str(spec_file))  # the CLI says why, without a traceback
        assert cli.returncode != 0 and "not queued" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr

        # a restart on the still-full disk comes up and keeps the job waiting for room
        d.kill9()
        d.start()
        waiting = wait_for(lambda: (j := d.job(job))["state"] in ("paused", "queued") and "disk" in j["reason"]
                           and j, 20, what="the job waiting for disk after a restart")
        assert waiting["state"] != "running"

        filler.unlink()
        try:
            done = d.wait_state(job, ("done", "failed"), 60)
        except AssertionError:
            print(subprocess.run(["df", "-k", str(small_disk)], capture_output=True, text=True).stdout,
                  subprocess.run(["du", "-ak", str(small_disk)], capture_output=True, text=True).stdout)
            print(d.job(job)["reason"], d.log()[-3000:], (Path(d.state_dir) / "jobs" / job / "worker.log").read_text()[-3000:])
            raise
        assert done["state"] == "done", done["reason"]
        log = Path(done["job_dir"]) / "synthetic.log"
        assert steps_in(log) == list(range(TOTAL))  # every step exactly once: none lost, none redone
        assert d.client().health()["unsaved_jobs"] == []
    finally:
        d.cleanup()
