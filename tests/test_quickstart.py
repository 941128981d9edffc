"""`edgezo quickstart` end to end: starts a daemon, runs the default spec (tiny model swapped in) with a
progress line, reports and plots, stops the daemon; the job stays queryable from the state directory."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from edgezo.testing.tiny import write_reviews

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_shows_progress_and_plots_and_its_job_stays_queryable(tiny_model_dir, tmp_path):
    """What a new user sees: a progress line with loss, rate and ETA while it runs, the report and two
    PNGs at the end; afterwards, with its daemon gone, `status` and `report` still answer."""
    train = write_reviews(tmp_path / "train.jsonl", 32, seed=0)
    dev = write_reviews(tmp_path / "dev.jsonl", 8, seed=1)
    sock = tmp_path / "run" / "edgezo.sock"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONPATH": str(REPO)}
    env.pop("EDGEZO_SOCKET", None)
    cmd = [sys.executable, "-m", "edgezo.cli", "quickstart", "--socket", str(sock), "--log", str(tmp_path / "d.log")]
    for s in (f"model={tiny_model_dir}", f"task.train={train}", f"task.eval={dev}", "steps=6", "eval_every=3",
              "batch_size=4", "max_length=32", "eval_size=8", "snapshot_every=0"):
        cmd += ["--set", s]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    progress = [line for line in out.stderr.splitlines() if re.search(r" running \d+/6 ", line)]
    stepping = [line for line in progress if re.search(r"loss \d\.\d{4}  \d+\.\d\d steps/s  ETA \d+", line)]
    assert stepping, out.stderr  # loss, rate and ETA while it runs
    assert re.search(r"mem \d+\.\d (MiB|GiB) \(peak", stepping[0])
    evals = re.findall(r"eval \((zero-shot|periodic|final)\) at step (\d+): accuracy \d+\.\d %", out.stderr)
    assert evals == [("zero-shot", "0"), ("periodic", "3"), ("final", "6")], out.stderr
    assert re.search(r"rt-sentiment-1 done 6/6", out.stderr)
    state = tmp_path / "state" / "edgezo"
    job_dir = state / "jobs" / "rt-sentiment-1"
    assert f"plots      {job_dir / 'memory.png'}  (memory timeline, " in out.stdout
    assert f"           {job_dir / 'training.png'}  (training loss and eval accuracy)" in out.stdout
    for png in ("memory.png", "training.png"):
        assert (job_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "starting a user-mode daemon" in out.stderr and f"still answer, from {state}" in out.stderr
    assert "memory     peak" in out.stdout and "zero-shot  accuracy" in out.stdout

    # The daemon it started is gone again.
    deadline = time.time() + 10
    while time.time() < deadline and any(
        "edgezo.cli" in " ".join(p.info["cmdline"] or []) and str(sock) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    ):
        time.sleep(0.2)
    assert not sock.exists() and not (state / "edgezo.db-wal").exists()

    # Its state directory answers instead, and is only read.
    before = hashlib.sha256((state / "edgezo.db").read_bytes()).hexdigest()
    files = sorted(p.name for p in state.iterdir())
    cli = [sys.executable, "-m", "edgezo.cli"]
    status = subprocess.run(cli + ["status", "--socket", str(sock)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"(no daemon running; read from {state})" in status.stderr
    assert re.search(r"^rt-sentiment-1\s+done\s+6/6", status.stdout, re.M), status.stdout
    report = subprocess.run(cli + ["report", "rt-sentiment-1", "--socket", str(sock), "--plot", "again.png"],
                            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "status     done" in report.stdout and "steps      6 / 6" in report.stdout
    assert "final      accuracy" in report.stdout
    assert (tmp_path / "again.png").is_file() and (tmp_path / "again-training.png").is_file()
    assert hashlib.sha256((state / "edgezo.db").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in state.iterdir()) == files  # no -wal or -shm left behind
