"""`edgezo quickstart` end to end: starts a daemon, runs the default spec (tiny model swapped in), reports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_runs_the_default_job_through_a_daemon_and_stops_it(tiny_model_dir, tmp_path):
    from tests.tiny import write_reviews

    train = write_reviews(tmp_path / "train.jsonl", 32, seed=0)
    dev = write_reviews(tmp_path / "dev.jsonl", 8, seed=1)
    sock = tmp_path / "run" / "edgezo.sock"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}
    env.pop("EDGEZO_SOCKET", None)
    sets = [f"model={tiny_model_dir}", f"task.train={train}", f"task.eval={dev}", "steps=4", "batch_size=4",
            "max_length=32", "eval_size=8", "snapshot_every=0"]
    cmd = [sys.executable, "-m", "edgezo.cli", "quickstart", "--socket", str(sock), "--log", str(tmp_path / "d.log")]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "starting a user-mode daemon" in out.stderr
    assert "status     done" in out.stdout and "steps      4 / 4" in out.stdout
    assert "zero-shot  accuracy" in out.stdout and "final      accuracy" in out.stdout
    assert "memory     peak" in out.stdout
    job_dirs = list((tmp_path / "state" / "edgezo" / "jobs").iterdir())
    assert len(job_dirs) == 1 and (job_dirs[0] / "report.json").is_file()
    # The daemon it started is gone again.
    deadline = time.time() + 10
    while time.time() < deadline and any(
        "edgezo.cli" in " ".join(p.info["cmdline"] or []) and str(sock) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    ):
        time.sleep(0.2)
    assert not sock.exists()
