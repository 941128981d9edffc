"""The worker↔daemon contract (edgezo/protocol.py) as a user of `edgezo status` sees it."""

from __future__ import annotations

import json
from pathlib import Path

from edgezo.protocol import PhaseTracker
from edgezo.testing.daemon import DaemonProc, synthetic_spec


def test_the_daemon_shows_the_phase_the_worker_states_at_every_phase_boundary():
    """After every event the worker emits, `edgezo status` shows the phase the worker says it is in:
    load, ZO steps, each leased eval and back, and the end."""
    d = DaemonProc(engine="tests.phase_probe:run_job", synthetic="step_s=0.03,heavy_every=3,heavy_bytes=8MiB,heavy_s=0.2")
    try:
        d.start()
        job = d.enqueue(synthetic_spec("phases", steps=7))["id"]
        done = d.wait_state(job, ("done", "failed"), 60)
        assert done["state"] == "done", done["reason"]
        seen = json.loads((Path(done["job_dir"]) / "phase_probe.json").read_text())
        assert [s for s in seen if s["worker"] != s["daemon"]] == []
        boundaries = [(s["event"], s["worker"]) for s in seen if s["event"] in ("start", "phase", "done")]
        assert boundaries == [("start", "zo_step"), ("phase", "eval"), ("phase", "zo_step"),
                              ("phase", "eval"), ("phase", "zo_step"), ("phase", "eval"), ("phase", "export"),
                              ("done", "export")]
    finally:
        d.cleanup()


def test_the_worker_states_the_step_phase_it_declared_and_export_once_every_step_is_done():
    t = PhaseTracker()
    assert t.stamp("phase", {"phase": "load", "state": "begin"})["worker_phase"] == "load"
    assert t.stamp("phase", {"phase": "load", "state": "end"})["worker_phase"] == "load"
    first = t.stamp("start", {"steps_total": 2, "resumed_from": 0, "step_phase": "fo_step"})
    assert first["worker_phase"] == "fo_step" and first["phase_seq"] == 1
    assert t.stamp("step", {"step": 0})["worker_phase"] == "fo_step"
    last = t.stamp("step", {"step": 1})
    assert last["worker_phase"] == "export" and last["phase_seq"] == 2
