"""Fault injection against a real daemon (issue 12): kills at random steps, a stopped daemon, file
descriptors running out, malformed specs through the CLI and raw HTTP, and a real second user.
Each case must end with the daemon serving and every acknowledged step done exactly once.

The synthetic engine (edgezo/worker.py) keeps the trainer's contract with timed steps and a
fsynced step log, so a kill's outcome is checked exactly without loading a model; the real
trainer's kill/resume is checked bit-for-bit in test_daemon_e2e.py and test_trainer.py."""

from __future__ import annotations

import json
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from edgezo.testing.daemon import DaemonProc, synthetic_spec, wait_for

FAST = "step_s=0.02,heavy_every=1000,heavy_s=0.01"
SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture
def daemons():
    made: list[DaemonProc] = []

    def make(*args, **kw) -> DaemonProc:
        d = DaemonProc(None, *args, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


def steps_in(job: dict) -> list[int]:
    return [int(x) for x in (Path(job["job_dir"]) / "synthetic.log").read_text().split()]


# ------------------------------------------------------------------------------ kills
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_of_the_worker_at_random_steps_loses_and_repeats_nothing(daemons, seed):
    rng = random.Random(seed)
    total = 150
    d = daemons("--retries", "3", synthetic=FAST).start()
    job = d.enqueue(synthetic_spec(f"kw{seed}", steps=total))["id"]
    kills = 0
    for at in sorted(rng.sample(range(5, total - 20), 3)):
        running = wait_for(lambda at=at: (j := d.job(job))["pid"] and j["step"] >= at and j, 30,
                           what=f"the worker past step {at}")
        os.kill(running["pid"], signal.SIGKILL)
        kills += 1
        wait_for(lambda pid=running["pid"]: d.job(job)["pid"] != pid, 20, what="the killed worker reaped")
    done = d.wait_state(job, ("done", "failed"), 60)
    assert done["state"] == "done", done["reason"]
    assert done["attempts"] == kills + 1
    assert steps_in(done) == list(range(total))


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_of_the_daemon_at_random_steps_loses_and_repeats_nothing(daemons, seed):
    rng = random.Random(100 + seed)
    total = 150
    d = daemons(synthetic=FAST).start()
    job = d.enqueue(synthetic_spec(f"kd{seed}", steps=total))["id"]
    for at in sorted(rng.sample(range(5, total - 20), 2)):
        wait_for(lambda at=at: (j := d.job(job))["state"] == "running" and j["step"] >= at, 30,
                 what=f"the job past step {at}")
        d.kill9()
        wait_for(lambda: not d.workers(), 15, what="the orphaned worker checkpointing and exiting")
        d.start()
    done = d.wait_state(job, ("done", "failed"), 60)
    assert done["state"] == "done", done["reason"]
    assert steps_in(done) == list(range(total))


def test_a_daemon_stopped_for_12_s_does_not_fail_its_jobs(daemons):
    """SIGSTOP: the worker's requests time out; it must neither fail nor lose its heartbeat thread."""
    total = 300
    d = daemons(synthetic=FAST).start()
    job = d.enqueue(synthetic_spec("stall", steps=total))["id"]
    wait_for(lambda: d.job(job)["step"] >= 10, 30, what="progress")
    d.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(12)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    done = d.wait_state(job, ("done", "failed"), 90)
    assert done["state"] == "done", done["reason"]
    assert steps_in(done) == list(range(total))
    assert d.client().health()["ok"]


# ------------------------------------------------------------------------------ descriptors
def test_running_out_of_file_descriptors_does_not_end_the_daemon(daemons):
    """Connections beyond the daemon's descriptor limit: clients are refused or told to retry, the
    daemon survives, and once they go it serves and runs jobs as before."""
    limit = 96

    def low_limit():  # soft and hard: the daemon raises its soft limit to the hard one at start
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    d = daemons(synthetic=FAST).start(preexec_fn=low_limit)
    hogs = []
    try:
        for _ in range(3 * limit):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(str(d.socket))
            except OSError:
                s.close()
                continue
            hogs.append(s)
        daemon = psutil.Process(d.proc.pid)
        wait_for(lambda: daemon.num_fds() >= limit - 1, 20, what="the daemon out of descriptors")
        time.sleep(1.0)  # out of descriptors for a while: the loop keeps sampling (reading /proc) meanwhile
        assert d.proc.poll() is None, d.log()
    finally:
        for s in hogs:
            s.close()
    wait_for(lambda: d.client().health()["ok"], 20, what="the daemon serving again")
    job = d.enqueue(synthetic_spec("after-fds", steps=20))["id"]
    assert steps_in(d.wait_state(job, "done", 30)) == list(range(20))


# ------------------------------------------------------------------------------ bad specs
BAD_SPECS: list[tuple[str, object, str]] = [  # (dotted field, value, the field the error must name)
    ("nonsense", 1, "nonsense"),
    ("model", 42, "model"),
    ("model", "/nonexistent/model", "model"),
    ("precision", "fp8", "precision"),
    ("precision", None, "precision"),
    ("trainable", "everything", "trainable"),
    ("trainable", "top-1", "trainable"),
    ("method", "sgd", "method"),
    ("method", ["mezo"], "method"),
    ("optim", "fast", "optim"),
    ("optim.lr", -1, "optim.lr"),
    ("optim.lr", "NaN", "optim.lr"),
    ("optim.lr", float("inf"), "optim.lr"),
    ("optim.lr", "fast", "optim.lr"),
    ("optim.eps", 0, "optim.eps"),
    ("optim.perturbations", 0, "optim.perturbations"),
    ("optim.perturbations", 2.5, "optim.perturbations"),
    ("optim.schedule", "cosine-ish", "optim.schedule"),
    ("optim.directions", "sideways", "optim.directions"),
    ("optim.rank", -2, "optim.rank"),
    ("optim.momentum", 0.9, "optim.momentum"),
    ("guard.lr_factor", 2.0, "guard.lr_factor"),
    ("guard.span", 0, "guard.span"),
    ("dizo.clip", 1.5, "dizo.clip"),
    ("dizo.interval", "often", "dizo.interval"),
    ("lora.rank", 0, "lora.rank"),
    ("lora.dropout", 1.5, "lora.dropout"),
    ("task", [], "task"),
    ("task.type", "regression", "task.type"),
    ("task.train", "/nonexistent/train.jsonl", "task.train"),
    ("task.eval", 7, "task.eval"),
    ("task.template", "", "task.template"),
    ("task.labels", "positive", "task.labels"),
    ("steps", -5, "steps"),
    ("steps", "many", "steps"),
    ("steps", 1e30, "steps"),
    ("steps", True, "steps"),
    ("batch_size", 0, "batch_size"),
    ("max_length", 2, "max_length"),
    ("eval_size", -1, "eval_size"),
    ("seed", "lucky", "seed"),
    ("budget", "lots", "budget"),
    ("budget", -1, "budget"),
    ("budget", "inf", "budget"),
    ("window", "every tuesday", "window"),
    ("output", "../../etc", "output"),
    ("output", "spec.json", "output"),
    ("device", "tpu", "device"),
    ("noise", "pink", "noise"),
    ("snapshot_every", -1, "snapshot_every"),
    ("fsync_every", -1, "fsync_every"),
    ("seed", 2**64, "seed"),
]


def _with(field: str, value: object) -> dict:
    spec = synthetic_spec("bad", steps=5)
    *path, last = field.split(".")
    node = spec
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


def test_malformed_specs_are_refused_naming_the_field_by_http_and_cli(daemons, tmp_path):
    assert len(BAD_SPECS) >= 40
    d = daemons(synthetic=FAST).start()
    wrong = []
    for field, value, named in BAD_SPECS:
        body = json.dumps({"spec": _with(field, value)}, allow_nan=True)
        http = d.curl("-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body,
                      "-w", "\n%{http_code}", "http://x/jobs")
        text, _, code = http.stdout.rpartition("\n")
        answer = json.loads(text) if text.startswith("{") else {}
        if code != "422" or answer.get("field") != named:
            wrong.append(("http", field, value, code, text[:200]))
        spec_file = tmp_path / "bad.json"
        spec_file.write_text(json.dumps(_with(field, value), allow_nan=True))
        cli = d.cli("enqueue", str(spec_file))
        if cli.returncode != 2 or f"'{named}'" not in cli.stderr or "Traceback" in cli.stderr:
            wrong.append(("cli", field, value, cli.returncode, cli.stderr[-200:]))
    assert not wrong, "\n".join(map(repr, wrong))
    assert d.client().jobs()["jobs"] == []  # nothing half-queued
    job = d.enqueue(synthetic_spec("fine", steps=5))["id"]
    assert d.wait_state(job, "done", 20)["state"] == "done"


# ------------------------------------------------------------------------------ a second user
@pytest.fixture
def second_user():
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("needs root, useradd and setpriv to act as a second user")
    name, group = "ezfault2", "edgezo"
    made_group = subprocess.run(["getent", "group", group], capture_output=True).returncode != 0
    if made_group and subprocess.run(["groupadd", group], capture_output=True).returncode != 0:
        pytest.skip("groupadd is not allowed here")
    subprocess.run(["userdel", name], capture_output=True)
    if subprocess.run(["useradd", "-M", "-N", "-g", group, "-s", "/usr/sbin/nologin", name],
                      capture_output=True).returncode != 0:
        pytest.skip("useradd is not allowed here")
    yield pwd.getpwnam(name)
    subprocess.run(["userdel", name], capture_output=True)
    if made_group:
        subprocess.run(["groupdel", group], capture_output=True)


def test_a_second_user_cannot_make_the_daemon_read_what_they_cannot(daemons, second_user, tmp_path):
    d = daemons(synthetic=FAST).start()
    os.chmod(d.tmp, 0o755)  # the socket's directory; the socket itself is 0660, group edgezo
    shared = Path(d.tmp) / "data"
    shared.mkdir(mode=0o755)
    row = '{"text": "fine", "label": 1}\n'
    public, private = shared / "public.jsonl", shared / "private.jsonl"
    for f, mode in ((public, 0o644), (private, 0o600)):
        f.write_text(row)
        f.chmod(mode)

    def as_user(path: Path) -> tuple[str, dict]:
        body = json.dumps({"spec": synthetic_spec("peer", steps=5, task={"train": str(path)})})
        out = subprocess.run(["setpriv", f"--reuid={second_user.pw_uid}", f"--regid={second_user.pw_gid}",
                              "--init-groups", "curl", "-sS", "--unix-socket", str(d.socket), "-X", "POST",
                              "--data-binary", body, "-w", "\n%{http_code}", "http://x/jobs"],
                             capture_output=True, text=True, timeout=30)
        text, _, code = out.stdout.rpartition("\n")
        return code, json.loads(text) if text.startswith("{") else {"raw": out.stdout + out.stderr}

    code, answer = as_user(private)
    assert code == "422" and answer["field"] == "task.train", answer
    assert "fine" not in json.dumps(answer)  # the file's content never comes back
    code, answer = as_user(public)
    assert code == "201", answer
    assert answer["owner_uid"] == second_user.pw_uid


# ------------------------------------------------------------------------------ a damaged WAL
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_the_wal_loses_no_acknowledged_change(daemons, where):
    """SQLite drops a WAL frame whose checksum fails, and every frame after it, silently: once that
    undid a cancel and lost an enqueue. The job directories' job.json bring them back."""
    d = daemons(synthetic=FAST).start()
    later = {"at": "0 0 1 1 *"}  # not before next New Year: stays queued
    waiting = d.client().request("POST", "/jobs", {"spec": synthetic_spec("wait", steps=5), **later})["id"]
    cancelled = d.client().request("POST", "/jobs", {"spec": synthetic_spec("gone", steps=5), **later})["id"]
    d.client().cancel(cancelled)
    time.sleep(0.5)  # a few more commits (samples) after the cancel
    d.kill9()  # no checkpoint: the changes are in the WAL only
    wal = Path(d.state_dir) / "edgezo.db-wal"
    data = bytearray(wal.read_bytes())
    page = int.from_bytes(data[8:12], "big")
    frames = (len(data) - 32) // (24 + page)
    assert frames > 3
    k = {"first": 0, "middle": frames // 2, "last": frames - 1}[where]
    data[32 + k * (24 + page) + 24 + 100] ^= 0xFF
    wal.write_bytes(bytes(data))
    d.start()
    assert d.job(waiting)["state"] == "queued"
    assert d.job(cancelled)["state"] == "cancelled"
    new = d.enqueue(synthetic_spec("new", steps=3))["id"]
    assert new not in (waiting, cancelled)
    assert d.wait_state(new, "done", 20)["state"] == "done"
