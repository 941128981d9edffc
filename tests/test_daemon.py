"""The daemon end to end with the synthetic engine (no model: fast, deterministic memory).

Each test runs a real daemon subprocess on a temp socket and state directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from edgezo.testing.daemon import DaemonProc, synthetic_spec, wait_for

MiB = 2**20


@pytest.fixture
def daemon_factory():
    made: list[DaemonProc] = []

    def make(*args, **kw) -> DaemonProc:
        d = DaemonProc(None, *args, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


def test_every_endpoint_answers_curl(daemon_factory):
    d = daemon_factory().start()
    body = json.dumps({"spec": synthetic_spec("curl", steps=6)})
    r = d.curl("-X", "POST", "-H", "Content-Type: application/json", "-d", body, "-w", "\n%{http_code}",
               "http://localhost/jobs")
    created, code = r.stdout.rsplit("\n", 1)
    assert code == "201", r.stdout + r.stderr
    job = json.loads(created)["id"]
    d.wait_state(job, "done", 30)
    for path in ("/", "/health", "/jobs", f"/jobs/{job}", f"/jobs/{job}/events", f"/jobs/{job}/report",
                 f"/jobs/{job}/memory", "/device", "/leases", "/debug/modules"):
        r = d.curl("-w", "\n%{http_code}", f"http://localhost{path}")
        text, code = r.stdout.rsplit("\n", 1)
        assert code == "200", (path, r.stdout, r.stderr)
        json.loads(text)
    logs = d.curl(f"http://localhost/jobs/{job}/logs").stdout
    assert "step 6/6" in logs
    follow = d.curl(f"http://localhost/jobs/{job}/events?follow=1").stdout.splitlines()
    assert json.loads(follow[-1])["kind"] == "exit"
    metrics = d.curl("http://localhost/metrics").stdout
    assert "# TYPE edgezo_budget_bytes gauge" in metrics
    assert 'edgezo_jobs{state="done"} 1' in metrics
    for line in metrics.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2
    assert d.curl("-w", "%{http_code}", "-o", "/dev/null", "http://localhost/nope").stdout == "404"
    assert d.curl("-w", "%{http_code}", "-o", "/dev/null", "-X", "PUT", "http://localhost/jobs").stdout == "405"
    r = d.curl("-X", "POST", "-w", "%{http_code}", "-o", "/dev/null", f"http://localhost/jobs/{job}/cancel")
    assert r.stdout == "200"


def test_bad_spec_is_rejected_naming_the_field(daemon_factory, tmp_path):
    d = daemon_factory().start()
    r = d.curl("-X", "POST", "-d", json.dumps({"spec": {"steps": -1}}), "http://localhost/jobs")
    err = json.loads(r.stdout)
    assert err["field"] == "steps"
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nbatch_size: zero\n")
    r = d.cli("enqueue", str(spec))
    assert r.returncode == 2 and "batch_size" in r.stderr


def test_enqueue_resolves_set_paths_where_typed_and_names_missing_ones(daemon_factory, tmp_path):
    """A relative --set path was resolved in the daemon's directory, and a path that did not exist was
    accepted and failed later in the worker (issue 12, item 7)."""
    d = daemon_factory().start()
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.jsonl").write_text('{"text": "fine", "label": 1}\n')
    r = d.cli("enqueue", "default", "--set", "task.train=nope.jsonl", cwd=here)
    assert r.returncode == 2 and "task.train" in r.stderr and f"{here / 'nope.jsonl'} does not exist" in r.stderr
    r = d.cli("enqueue", "default", "--set", "model=./no-model-dir", cwd=here)
    assert r.returncode == 2 and "'model'" in r.stderr
    assert d.client().jobs()["jobs"] == []  # nothing was queued
    r = d.cli("enqueue", "default", "--set", "task.train=mine.jsonl", "--set", "steps=1", "--json", cwd=here)
    assert r.returncode == 0, r.stderr
    job = d.job(json.loads(r.stdout)["id"])
    assert job["spec"]["task"]["train"] == str(here / "mine.jsonl")


def test_admission_waits_then_starts_the_third(daemon_factory):
    # each job declares 300 MiB; a 700 MiB budget holds two
    d = daemon_factory(budget="700MiB").start()
    ids = [d.enqueue(synthetic_spec(f"adm{i}", steps=30, budget="300MiB"))["id"] for i in range(3)]
    wait_for(lambda: sum(d.job(i)["state"] == "running" for i in ids) == 2, 10, what="two running")
    third = d.job(ids[2])
    assert third["state"] == "queued"
    assert third["reason"].startswith("waiting: needs 300.0 MiB") and "under budget 700.0 MiB" in third["reason"]
    status = d.cli("status")
    assert status.returncode == 0 and "waiting: needs 300.0 MiB" in status.stdout
    for i in ids:
        d.wait_state(i, "done", 60)
    starts = {i: next(e["ts"] for e in d.events(i) if e["kind"] == "admitted") for i in ids}
    ends = {i: next(e["ts"] for e in d.events(i) if e["kind"] == "exit") for i in ids}
    assert starts[ids[2]] >= min(ends[ids[0]], ends[ids[1]]) - 0.01


class RssWatch:
    """Independent of the daemon: sums the RSS of the daemon's worker processes every 10 ms."""

    def __init__(self, daemon_pid: int):
        self.root = psutil.Process(daemon_pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            try:
                kids = self.root.children()
            except psutil.Error:
                return
            for k in kids:
                try:
                    total += k.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(2)


def _stagger(daemon_factory, *flags: str) -> tuple[int, int, list[dict]]:
    budget = 320 * MiB  # 3 workers (~30-50 MiB each) + one 120 MiB phase fit; two phases do not
    d = daemon_factory("--pressure-grace", "120", "--reserve", "0", *flags, budget=str(budget),
                       synthetic="step_s=0.04,heavy_every=4,heavy_bytes=120MiB,heavy_s=0.25").start()
    with RssWatch(d.proc.pid) as watch:
        ids = [d.enqueue(synthetic_spec(f"st{i}", steps=16, budget="50MiB"))["id"] for i in range(3)]
        for i in ids:
            d.wait_state(i, ("done", "failed"), 90)
    reports = [d.client().report(i) for i in ids]
    return watch.peak, budget, reports


@pytest.mark.parametrize("policy", ["fifo", "phase-offset"])
def test_leases_keep_heavy_phases_under_the_budget(daemon_factory, policy):
    peak, budget, reports = _stagger(daemon_factory, "--lease-policy", policy)
    assert all(r["status"] == "done" for r in reports), reports
    # every heavy phase ran: 3 periodic (steps 4, 8, 12) + the final one, none dropped
    assert [r["metrics"]["heavy_phases"] for r in reports] == [4, 4, 4]
    assert peak <= budget, f"peak {peak / MiB:.0f} MiB over budget {budget / MiB:.0f} MiB"
    for r in reports:
        phases = r["memory"]["daemon"]["phases"]
        assert phases["eval"]["peak_bytes"] > phases["zo_step"]["peak_bytes"] + 100 * MiB


def test_without_leases_heavy_phases_collide(daemon_factory):
    peak, budget, reports = _stagger(daemon_factory, "--no-leases")
    assert all(r["status"] == "done" for r in reports)
    assert peak > budget, "with leases disabled the phases should overlap and exceed the budget"


def test_kill9_of_a_worker_marks_the_job_failed(daemon_factory):
    d = daemon_factory().start()
    job = d.enqueue(synthetic_spec("victim", steps=100000))["id"]
    running = wait_for(lambda: (j := d.job(job))["pid"] and j["step"] > 2 and j, 20, what="worker running")
    os.kill(running["pid"], signal.SIGKILL)
    failed = d.wait_state(job, "failed", 10)
    assert failed["reason"] == "killed by signal 9 (SIGKILL)"
    assert d.client().health()["ok"]
    status = d.cli("status")
    assert "killed by signal 9" in status.stdout
    other = d.enqueue(synthetic_spec("after", steps=4))["id"]
    d.wait_state(other, "done", 20)


def test_kill9_of_a_worker_is_retried_when_configured(daemon_factory):
    d = daemon_factory("--retries", "1").start()
    job = d.enqueue(synthetic_spec("retry", steps=40))["id"]
    running = wait_for(lambda: (j := d.job(job))["pid"] and j["step"] > 2 and j, 20, what="worker running")
    os.kill(running["pid"], signal.SIGKILL)
    done = d.wait_state(job, ("done", "failed"), 30)
    assert done["state"] == "done" and done["attempts"] == 2
    log = (Path(done["job_dir"]) / "synthetic.log").read_text().split()
    assert [int(x) for x in log] == list(range(40))


def test_worker_failure_reason_comes_from_failure_json(daemon_factory):
    d = daemon_factory(engine="edgezo.testing.daemon:cuda_oom_engine").start()
    job = d.enqueue(synthetic_spec("oom", steps=10))["id"]
    failed = d.wait_state(job, "failed", 20)
    assert failed["reason"].startswith("CUDA out of memory: OutOfMemoryError: CUDA out of memory. Tried to allocate")
    failure = json.loads((Path(failed["job_dir"]) / "failure.json").read_text())
    assert failure["type"] == "cuda_oom"
    assert "CUDA out of memory" in d.cli("status").stdout
    assert d.client().health()["ok"]


def test_daemon_kill9_then_restart_resumes_without_lost_steps(daemon_factory):
    d = daemon_factory().start()
    total = 60
    job = d.enqueue(synthetic_spec("resume", steps=total))["id"]
    wait_for(lambda: d.job(job)["step"] >= 10, 20, what="progress")
    seen = d.job(job)["step"]
    d.kill9()
    # the worker learns of its parent's death (PDEATHSIG), checkpoints and exits on its own
    wait_for(lambda: not d.workers(), 10, what="orphaned worker exit")
    d.start()
    resumed = d.wait_state(job, "done", 40)
    assert resumed["attempts"] == 2
    log = (Path(d.state_dir) / "jobs" / job / "synthetic.log").read_text().split()
    assert [int(s) for s in log] == list(range(total))  # every step exactly once: none lost, none redone
    starts = [e["data"] for e in d.events(job) if e["kind"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from"] >= seen
    assert any(e["kind"] == "recovered" for e in d.events(job))


def test_sigterm_pauses_workers_and_restart_resumes(daemon_factory):
    d = daemon_factory().start()
    job = d.enqueue(synthetic_spec("graceful", steps=80))["id"]
    wait_for(lambda: d.job(job)["step"] >= 5, 20, what="progress")
    assert d.stop() == 0
    assert not d.workers()
    d.start()
    done = d.wait_state(job, "done", 30)
    assert done["step"] == 80
    exits = [e["data"] for e in d.events(job) if e["kind"] == "exit"]
    assert exits[0]["state"] == "paused" and "daemon stopped" in exits[0]["reason"]


def test_cancel_queued_and_running(daemon_factory):
    d = daemon_factory(budget="300MiB").start()
    run = d.enqueue(synthetic_spec("long", steps=100000, budget="200MiB"))["id"]
    queued = d.enqueue(synthetic_spec("waits", steps=5, budget="200MiB"))["id"]
    d.wait_state(run, "running", 10)
    assert d.job(queued)["state"] == "queued"
    r = d.cli("cancel", queued)
    assert r.returncode == 0 and "cancelled" in r.stdout
    wait_for(lambda: d.job(run)["step"] > 1, 10, what="progress")
    d.cli("cancel", run)
    assert d.wait_state(run, "cancelled", 15)["state"] == "cancelled"
    assert d.cli("cancel", "nope").returncode == 2


def test_window_outside_waits_inside_runs(daemon_factory):
    d = daemon_factory().start()
    hour = time.localtime().tm_hour
    closed = f"* {(hour + 3) % 24} * * *"
    job = d.enqueue(synthetic_spec("night", steps=4), window=closed)["id"]
    wait_for(lambda: "outside its window" in d.job(job)["reason"], 5, what="window reason")
    assert d.job(job)["state"] == "queued"
    open_now = d.enqueue(synthetic_spec("now", steps=4), window="* * * * *")["id"]
    d.wait_state(open_now, "done", 20)
    assert d.job(job)["state"] == "queued"


def test_status_table_logs_and_report_cli(daemon_factory, tmp_path):
    d = daemon_factory().start()
    job = d.enqueue(synthetic_spec("cli", steps=8))["id"]
    r = d.cli("logs", job, "-f", timeout=30)
    assert r.returncode == 0 and "step 8/8" in r.stdout
    table = d.cli("status").stdout
    assert table.splitlines()[0].split()[:4] == ["JOB", "STATE", "STEP", "STEPS/S"]
    assert f"{job}   done" in table
    rep = d.cli("report", job, "--json")
    report = json.loads(rep.stdout)
    assert report["memory"]["daemon"]["peak_bytes"] > 0
    assert set(report["memory"]["daemon"]["phases"]) >= {"zo_step", "eval"}
    png = tmp_path / "mem.png"
    rep = d.cli("report", job, "--plot", str(png))
    assert rep.returncode == 0 and png.stat().st_size > 1000
    one = json.loads(d.cli("status", job, "--json").stdout)
    assert one["state"] == "done" and one["spec"]["steps"] == 8


def test_peer_credentials_gate_changes_not_reads(daemon_factory):
    d = daemon_factory().start()
    os.chmod(d.tmp, 0o755)
    os.chmod(d.socket, 0o666)  # let "nobody" connect at all; the API must still refuse changes
    probe = (
        "import json,sys\n"
        "from edgezo.client import Client, ApiError\n"
        "import os\n"
        "os.setgid(65534); os.setgroups([]); os.setuid(65534)\n"
        f"c = Client({str(d.socket)!r})\n"
        "out = {'list': len(c.jobs()['jobs'])}\n"
        "try:\n"
        "    c.enqueue({'name': 'x', 'steps': 1}); out['create'] = 'allowed'\n"
        "except ApiError as e:\n"
        "    out['create'] = e.status\n"
        "print(json.dumps(out))\n"
    )
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")

    # the probe imports as root, then drops to "nobody" before it connects (SO_PEERCRED sees 65534)
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=d.env, cwd="/",
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"list": 0, "create": 403}


def test_socket_mode_is_0660(daemon_factory):
    d = daemon_factory().start()
    assert os.stat(d.socket).st_mode & 0o777 == 0o660


def test_daemon_never_imports_torch(daemon_factory):
    d = daemon_factory().start()
    job = d.enqueue(synthetic_spec("light", steps=4))["id"]
    d.wait_state(job, "done", 20)
    assert not any(m == "torch" or m.startswith("torch.") for m in d.client().request("GET", "/debug/modules")["modules"])
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
    assert d.client().health()["torch_loaded"] is False


def test_a_lease_deadlock_is_broken_and_both_jobs_finish(daemon_factory):
    """Two jobs whose final heavy phase fits alone but not beside the other: both wait on their lease
    at the end of their run, nothing holds one, so the daemon pauses the youngest; the other runs
    its phase and finishes, then the paused one is readmitted, resumes and finishes too.

    Each worker holds ~150 MiB (128 MiB + the runtime) while it waits, idle: 150 + 250 fits in 450,
    150 + 150 + 250 does not."""
    d = daemon_factory("--lease-max-wait", "2", "--reserve", "0", budget="450MiB",
                       synthetic="step_s=0.05,heavy_every=1000,heavy_bytes=250MiB,heavy_s=0.3,base_bytes=128MiB").start()
    ids = [d.enqueue(synthetic_spec(f"dl{i}", steps=20, budget="200MiB"))["id"] for i in range(2)]
    done = [d.wait_state(j, ("done", "failed"), 90) for j in ids]
    assert [j["state"] for j in done] == ["done", "done"], done
    pauses = {j: [e["data"]["reason"] for e in d.events(j) if e["kind"] == "pause"] for j in ids}
    broken = [j for j, reasons in pauses.items() if any("lease deadlock" in r for r in reasons)]
    assert len(broken) == 1, pauses
    for j in ids:
        assert d.client().report(j)["metrics"]["heavy_phases"] == 1
