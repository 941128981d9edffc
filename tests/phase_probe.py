"""A worker engine for tests/test_protocol.py: the synthetic engine, and after every event it emits,
a look at what the daemon shows for the job, kept in JOB_DIR/phase_probe.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgezo.client import Client
from edgezo.testing.synthetic import synthetic_run_job


class _Probe:
    def __init__(self, hooks):
        self.hooks = hooks
        self.client = Client(hooks.socket_path, timeout=10)
        self.seen: list[dict] = []

    def on_event(self, kind: str, data: dict) -> None:
        self.hooks.on_event(kind, data)
        stated = self.hooks.phases.stated[0]
        shown, end = None, time.monotonic() + 10
        while time.monotonic() < end:  # events go out on a sender thread: the daemon hears it shortly
            shown = self.client.job(self.hooks.job_id)["phase"]
            if shown == stated:
                break
            time.sleep(0.01)
        self.seen.append({"event": kind, "worker": str(stated), "daemon": shown})

    def __getattr__(self, name):  # leases and control: the real hooks
        return getattr(self.hooks, name)


def run_job(job_dir: Path, hooks) -> dict:
    probe = _Probe(hooks)
    try:
        return synthetic_run_job(job_dir, probe)
    finally:
        (Path(job_dir) / "phase_probe.json").write_text(json.dumps(probe.seen))
        probe.client.close()
