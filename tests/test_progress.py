"""The progress line of `edgezo quickstart` and `edgezo status JOB --watch`, on real daemon jobs."""

from __future__ import annotations

import io
import re

from edgezo.progress import ProgressPrinter, eta_s, fmt_duration, progress_line
from edgezo.testing.daemon import DaemonProc, synthetic_spec, wait_for

PROGRESS = re.compile(r"(\d+)/(\d+)\s+loss (\d+\.\d+)\s+(\d+\.\d+) steps/s\s+ETA (\S+)")


def test_the_line_of_a_running_job_has_loss_rate_eta_memory_and_phase():
    d = DaemonProc().start()
    try:
        job = d.enqueue(synthetic_spec("line", steps=400))["id"]
        info = wait_for(lambda: (j := d.job(job))["state"] == "running" and j["step"] >= 2 and j.get("mem_now")
                        and j, 30, what="a running job with steps and a memory sample")
        line = progress_line(info)
        m = PROGRESS.search(line)
        assert m, line
        step, total = int(m.group(1)), int(m.group(2))
        assert total == 400 and step >= 2
        assert float(m.group(3)) == round(info["loss"], 4)
        # the ETA is the steps left at the current rate
        assert m.group(5) == fmt_duration((400 - info["step"]) / info["steps_per_s"])
        assert re.search(r"mem \d+\.\d (MiB|GiB) \(peak \d+\.\d (MiB|GiB)\)", line), line
        assert "zo_step" in line or "eval" in line
        d.client().cancel(job)
    finally:
        d.cleanup()


def test_status_watch_follows_a_job_to_its_end_with_plain_lines():
    d = DaemonProc().start()
    try:
        job = d.enqueue(synthetic_spec("watched", steps=24))["id"]
        r = d.cli("status", job, "--watch", timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert "\r" not in r.stdout  # captured: plain lines, no redrawing
        stepping = [ln for ln in lines if PROGRESS.search(ln)]
        assert stepping, r.stdout  # the first step's line comes at once, with the rate and the ETA
        m = PROGRESS.search(stepping[0])
        assert int(m.group(2)) == 24 and float(m.group(4)) > 0
        assert re.search(rf"{job} done 24/24\s+loss 0\.0417", lines[-1]), lines[-1]  # the synthetic loss: 1/24
        assert len(lines) < 15  # a line per change, not one per step
    finally:
        d.cleanup()


def _view(step: int, phase: str = "zo_step", state: str = "running") -> dict:
    return {"id": "rt-1", "state": state, "control": "run", "step": step, "steps_total": 100, "loss": 0.5,
            "steps_per_s": 1.0, "phase": phase, "mem_now": 700 * 2**20, "mem_peak": 750 * 2**20, "leases": []}


def test_plain_output_prints_changes_at_once_and_otherwise_every_n_seconds():
    now = [0.0]
    out = io.StringIO()
    p = ProgressPrinter("rt-1", out, tty=False, every=30, clock=lambda: now[0])
    p.feed([], _view(0, "load"))
    for step in range(1, 100):  # a step a second, an eval in the middle
        now[0] = float(step)
        events = [{"kind": "step", "data": {"step": step - 1, "loss": 0.5, "steps_per_s": 1.0}}]
        if step == 50:
            events.append({"kind": "eval", "data": {"step": 50, "tag": "periodic",
                                                    "metrics": {"accuracy": 0.8, "n": 200}}})
        p.feed(events, _view(step, "eval" if step == 50 else "zo_step"))
    now[0] = 100.0
    p.feed([], _view(100, "", "done"))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[0s] rt-1 running 0/100") and "load" in lines[0]
    assert "1/100" in lines[1] and "ETA 1m39s" in lines[1]  # the first step, before the 30 s are up
    assert any("eval (periodic) at step 50: accuracy 80.0 % (n=200)" in ln for ln in lines)
    assert any(ln.endswith("eval") for ln in lines)  # the phase change, at once
    assert lines[-1].startswith("[1m40s] rt-1 done 100/100") and "ETA" not in lines[-1]
    assert len(lines) <= 12, lines  # 100 s of steps: changes plus one line each 30 s


def test_a_terminal_gets_one_line_redrawn_with_a_bar():
    out = io.StringIO()
    p = ProgressPrinter("rt-1", out, tty=True, every=30)
    for step in range(1, 5):
        p.feed([{"kind": "step", "data": {"step": step - 1, "loss": 0.5, "steps_per_s": 1.0}}], _view(step))
    p.feed([], _view(100, "", "done"))
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, left on a fresh one at the end
    assert text.count("\r\x1b[K") == 5 and "[#" in text and "[####################] 100/100" in text


def test_eta_needs_a_rate():
    assert eta_s({"step": 10, "steps_total": 60}) is None
    assert eta_s({"step": 10, "steps_total": 60, "steps_per_s": 0.5}) == 100
    assert fmt_duration(3725) == "1h02m" and fmt_duration(185) == "3m05s" and fmt_duration(12.4) == "12s"
