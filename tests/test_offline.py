"""`edgezo status`, `report` and `logs` after the daemon has gone: read from its state directory."""

from __future__ import annotations

import hashlib

from edgezo.testing.daemon import DaemonProc, synthetic_spec, wait_for


def _digest(state_dir) -> dict[str, str]:
    """The store's database and write-ahead log (the -shm index beside them is shared memory that every
    SQLite reader writes its read marks into, by design)."""
    return {name: hashlib.sha256((state_dir / name).read_bytes()).hexdigest() for name in ("edgezo.db", "edgezo.db-wal")}


def test_status_report_and_logs_read_the_state_dir_of_a_killed_daemon():
    d = DaemonProc().start()
    try:
        done = d.enqueue(synthetic_spec("finished", steps=8))["id"]
        d.wait_state(done, "done", 60)
        running = d.enqueue(synthetic_spec("unfinished", steps=100000))["id"]
        wait_for(lambda: d.job(running)["step"] >= 2, 60, what="the second job stepping")
        d.kill9()  # no clean close: the store's write-ahead log is still there
        wait_for(lambda: not d.workers(), 30, what="the worker checkpointing after its daemon died")
        assert (d.state_dir / "edgezo.db-wal").exists()
        before = _digest(d.state_dir)

        r = d.cli("status", "--state-dir", str(d.state_dir))
        assert r.returncode == 0, r.stderr
        assert f"(no daemon running; read from {d.state_dir})" in r.stderr
        rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:] if line.split()}
        assert rows[done][1:3] == ["done", "8/8"]
        assert rows[running][1] == "paused"
        assert "the daemon stopped while it ran; it resumes from its seed-log" in r.stdout

        r = d.cli("report", done, "--state-dir", str(d.state_dir))
        assert r.returncode == 0, r.stderr
        assert "status     done" in r.stdout and "daemon     peak" in r.stdout

        r = d.cli("status", "finished", "--state-dir", str(d.state_dir))  # by name, as with a daemon
        assert r.returncode == 0 and f"id           {done}" in r.stdout

        r = d.cli("logs", done, "--state-dir", str(d.state_dir))
        assert r.returncode == 0 and "done" in r.stdout

        r = d.cli("report", "nosuchjob", "--state-dir", str(d.state_dir))
        assert r.returncode == 2 and f"no job 'nosuchjob' in {d.state_dir}" in r.stderr
        assert _digest(d.state_dir) == before  # read, never written

        d.start()  # the store was left as a daemon needs it: the next one carries on
        assert d.job(done)["state"] == "done"
        assert d.wait_state(running, "running", 30)
    finally:
        d.cleanup()
