"""The daemon's pieces in-process: store summaries, lease broker, windows, pressure, routing."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from daemon import windows
from daemon.core import Config, Daemon
from daemon.http import HTTPError, Router
from daemon.leases import LeaseBroker
from daemon.monitor import DeviceState
from daemon.store import Job, memory_summary
from edgezo.protocol import PhaseTracker

MiB = 2**20


def test_memory_summary_is_time_weighted_per_phase():
    samples = [(0.0, 100, "zo_step"), (1.0, 100, "zo_step"), (2.0, 400, "eval"), (2.5, 100, "zo_step"),
               (3.5, 100, "zo_step")]
    s = memory_summary(samples)
    assert s["peak_bytes"] == 400
    # trapezoid: 100·1 + 250·1 + 250·0.5 + 100·1 over 3.5 s; an interval belongs to the phase at its start
    assert s["avg_bytes"] == round((100 + 250 + 125 + 100) / 3.5)
    assert s["phases"]["eval"] == {"peak_bytes": 400, "avg_bytes": 250, "duration_s": 0.5, "samples": 1}
    assert s["phases"]["zo_step"] == {"peak_bytes": 100, "avg_bytes": round((100 + 250 + 100) / 3),
                                      "duration_s": 3.0, "samples": 4}
    assert memory_summary([])["peak_bytes"] == 0


def test_lease_broker_counts_only_what_measurement_does_not_show_yet():
    b = LeaseBroker(ttl_s=5)
    usage = {"a": 100 * MiB}
    lease = b.request("a", "eval", 50 * MiB, now=0)
    assert [x.key for x in b.grant(60 * MiB, 0, lambda j: usage[j])] == ["a/eval"]
    assert lease.granted == 0 and b.outstanding(lambda j: usage[j]) == 50 * MiB
    usage["a"] = 130 * MiB  # the phase has allocated 30 of its 50 MiB
    assert b.outstanding(lambda j: usage[j]) == 20 * MiB
    b.request("b", "eval", 80 * MiB, now=1)
    assert b.grant(40 * MiB, 1, lambda j: 0) == []  # does not fit: keeps waiting
    assert b.expire(3, lambda j: 2.9) == []
    gone = b.expire(7, lambda j: 1.0 if j == "a" else 6.9)  # a stopped heartbeating; b stopped asking
    assert {x.key for x in gone} == {"a/eval", "b/eval"}


def test_disabled_leases_grant_everything():
    b = LeaseBroker(enabled=False)
    b.request("a", "eval", 10**12, 0)
    assert len(b.grant(0, 0, lambda j: 0)) == 1


def test_window_semantics():
    t = datetime(2025, 1, 1, 3, 30).astimezone()
    assert windows.in_window("* 1-5 * * *", t)
    assert windows.in_window("0 1-5 * * *", t)  # a single minute widens to the whole hour
    assert not windows.in_window("* 6-7 * * *", t)
    assert windows.in_window("15-45 3 * * *", t) and not windows.in_window("40-45 3 * * *", t)
    opening, closing = windows.window_edges("* 1-5 * * *", t)
    assert opening is None and closing.hour == 6 and closing.minute == 0
    opening, _ = windows.window_edges("* 6 * * *", t)
    assert opening.hour == 6
    with pytest.raises(ValueError):
        windows.validate("not cron")


@pytest.fixture
def core(tmp_path):
    d = Daemon(Config(state_dir=tmp_path / "state", socket_path=tmp_path / "s.sock", budget=1000 * MiB,
                      reserve=0, pressure_grace_s=1.0))
    d.open()
    yield d
    d.store.close()


def _running(d: Daemon, job_id: str, started: float, **kw) -> Job:
    kw.setdefault("pid", None)
    job = Job(id=job_id, seq=len(d.jobs) + 1, name=job_id, spec={"budget": None, "steps": 10}, job_dir="/nonexistent",
              created=started, state="running", started=started, estimate=300 * MiB, **kw)
    d.jobs[job_id] = job
    return job


def _device(used: int, free: int = 10**12) -> DeviceState:
    return DeviceState(ts=time.time(), source="system", name="test", total=10**12, used=used, free=free,
                       edgezo=used, jobs={})


def test_pressure_pauses_the_youngest_after_the_grace(core):
    old = _running(core, "old", 1.0)
    young = _running(core, "young", 2.0)
    core.device = _device(1200 * MiB)
    core.scheduler.relieve_pressure(100.0)
    assert old.control == young.control == "run"  # within the grace period
    core.scheduler.relieve_pressure(101.5)
    assert young.control == "pause" and old.control == "run"
    assert "memory pressure" in young.pause_reason
    core.scheduler.relieve_pressure(103.0)
    assert old.control == "run"  # one at a time
    core.device = _device(500 * MiB)
    core.scheduler.relieve_pressure(104.0)
    assert core.scheduler.over_since is None


def test_external_pressure_through_available_memory(core):
    core.cfg.reserve = 256 * MiB
    job = _running(core, "only", 1.0)
    core.device = _device(100 * MiB, free=100 * MiB)  # the system is nearly out of memory
    core.scheduler.relieve_pressure(10.0)
    core.scheduler.relieve_pressure(11.5)
    assert job.control == "pause"


def test_window_closing_pauses_a_running_job(core):
    hour = time.localtime().tm_hour
    job = _running(core, "night", 1.0, window=f"* {(hour + 2) % 24} * * *")
    core.scheduler.enforce_windows(time.time())
    assert job.control == "pause" and "outside its window" in job.pause_reason


def test_admission_uses_declared_budget_and_measurement(core):
    core.device = _device(0)
    job = _running(core, "a", 1.0)
    assert core.scheduler.steady(job) == 300 * MiB
    job.measured = 120 * MiB
    assert core.scheduler.steady(job) == 120 * MiB
    job.spec["budget"] = 200 * MiB
    assert core.scheduler.steady(job) == 200 * MiB  # a declared allotment is kept even when it measures less
    assert core.scheduler.headroom() == 1000 * MiB - 200 * MiB


def test_recovery_marks_running_jobs_for_resume(tmp_path):
    cfg = Config(state_dir=tmp_path / "state", socket_path=tmp_path / "s.sock", budget=1000 * MiB)
    d = Daemon(cfg)
    d.open()
    job = _running(d, "r", 1.0, pid=999999)
    d.save(job)
    d.store.close()
    fcntl.flock(d._lock_fd, fcntl.LOCK_UN)
    os.close(d._lock_fd)
    d2 = Daemon(cfg)
    d2.open()
    again = d2.jobs["r"]
    assert again.state == "paused" and again.pid is None and "daemon restart" in again.reason
    d2.store.close()


def test_router_matches_and_rejects():
    r = Router()

    async def h(req):
        return None

    r.add("GET", "/jobs/{id}", h)
    r.add("POST", "/jobs/{id}/cancel", h, mutating=True)
    handler, params, mutating = r.match("GET", "/jobs/abc-1")
    assert params == {"id": "abc-1"} and not mutating
    assert r.match("POST", "/jobs/x/cancel")[2]
    with pytest.raises(HTTPError) as e:
        r.match("DELETE", "/jobs/x")
    assert e.value.status == 405
    with pytest.raises(HTTPError) as e:
        r.match("GET", "/nope")
    assert e.value.status == 404
    assert asyncio.run(h(None)) is None


def test_a_lease_deadlock_pauses_the_youngest_after_the_wait(core):
    """Every running job waits on a lease none of which fits and nobody holds one: nothing would
    change by itself, so after lease_max_wait_s the youngest pauses and frees its memory."""
    core.cfg.lease_max_wait_s = 5.0
    jobs = [_running(core, j, float(i)) for i, j in enumerate(["a", "b", "c"])]
    core.device = _device(900 * MiB)
    for j in jobs:
        core.leases.request(j.id, "projection", 300 * MiB, now=0.0)
    core.scheduler.unblock_leases(100.0)
    assert all(j.control == "run" for j in jobs)  # stuck, but not for long enough yet
    core.scheduler.unblock_leases(106.0)
    assert jobs[2].control == "pause" and "lease deadlock" in jobs[2].pause_reason
    assert jobs[0].control == jobs[1].control == "run"
    core.scheduler.unblock_leases(200.0)
    assert jobs[1].control == "run"  # one at a time: the paused one has not exited yet


@pytest.mark.parametrize("steps_left", [0, 3])
def test_jobs_idle_at_their_last_lease_count_at_what_they_hold(core, steps_left):
    """Three jobs measured at 300 MiB while stepping now hold 280 each and wait for a 150 MiB lease.
    Still stepping, each may climb back to 300: 900 committed, no lease fits (a deadlock, broken by
    a pause). With every step done they sleep until granted: 840 committed, one lease fits now."""
    core.cfg.lease_max_wait_s = 5.0
    jobs = [_running(core, j, float(i), steps_total=10, step=10 - steps_left, measured=300 * MiB)
            for i, j in enumerate(["a", "b", "c"])]
    core.device = _device(840 * MiB)
    for j in jobs:
        core.device.jobs[j.id] = 280 * MiB
        core.leases.request(j.id, "projection", 150 * MiB, now=0.0)
    core.scheduler.grant(1.0)
    core.scheduler.unblock_leases(1.0)
    core.scheduler.unblock_leases(10.0)
    granted = [x.job_id for x in core.leases.granted()]
    if steps_left:
        assert granted == [] and jobs[2].control == "pause" and "lease deadlock" in jobs[2].pause_reason
    else:
        assert len(granted) == 1 and all(j.control == "run" for j in jobs)
        assert core.scheduler.headroom() < 150 * MiB  # the grant is counted: a second one waits its turn


def test_waiting_leases_come_before_admitting_another_job(core):
    """Memory freed by a paused job goes to the running jobs' waiting heavy phases, not to a
    readmission that would recreate the deadlock."""
    _running(core, "a", 1.0)
    core.device = _device(400 * MiB)
    core.leases.request("a", "projection", 500 * MiB, now=0.0)
    queued = Job(id="q", seq=9, name="q", spec={"budget": None, "steps": 10}, job_dir="/nonexistent",
                 created=0.0, state="queued", estimate=300 * MiB, queued_at=0.0)
    core.jobs["q"] = queued
    started: list[str] = []
    core.start = lambda job, now: started.append(job.id)
    core.scheduler.admit(10.0)
    assert started == [] and queued.reason  # 400 used + 500 promised to a waiting phase + 300 > 1000
    core.leases.release("a", "projection")
    core.scheduler.admit(11.0)
    assert started == ["q"]


def test_a_phase_that_cannot_fit_even_alone_fails_the_job_with_the_numbers(core):
    from edgezo.protocol import Exit

    core.cfg.lease_max_wait_s = 0.0
    core.cfg.cancel_grace_s = 60.0
    job = _running(core, "big", 1.0)
    core.device = _device(700 * MiB)
    core.device.jobs["big"] = 700 * MiB
    core.leases.request("big", "projection", 600 * MiB, now=0.0)

    async def decide() -> None:
        core.scheduler.unblock_leases(1.0)
        core.scheduler.unblock_leases(2.0)
        for t in list(core.workers.tasks):
            t.cancel()

    asyncio.run(decide())
    assert job.control == "stop" and job.reason.startswith("failing:")
    core._finish(job, Exit.CANCELLED, None)  # the worker stopped at a step boundary
    assert job.state == "failed"
    assert "600.0 MiB" in job.reason and "--budget" in job.reason, job.reason


def test_a_job_allotted_more_than_the_whole_budget_is_refused_at_enqueue(core):
    from edgezo.spec import SpecError

    with pytest.raises(SpecError) as e:
        core.enqueue({"name": "huge", "budget": "2GiB"})
    assert e.value.field == "budget" and "1000.0 MiB" in str(e.value)
    assert not core.jobs


def test_an_enqueue_the_store_cannot_keep_is_refused_and_leaves_nothing(core):
    """Acknowledged only once durable: SQLite's own "database or disk is full" (a page cap here; the
    tmpfs test in test_fault_disk_full.py stops earlier, at the disk check) refuses the job whole."""
    from daemon.store import DiskFull

    kept = core.enqueue({"name": "kept", "batch_size": 1, "max_length": 32})
    (pages,) = core.store.db.execute("PRAGMA page_count").fetchone()
    core.store.db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(DiskFull) as e:
        core.enqueue({"name": "lost", "batch_size": 1, "max_length": 32,
                      "task": {"template": "Review: {text}" + " " * 20000 + "\\nSentiment:"}})  # needs new pages
    assert "not queued" in str(e.value)
    assert list(core.jobs) == [kept.id] and [j.id for j in core.store.load_jobs()] == [kept.id]
    assert sorted(p.name for p in core.jobs_dir.iterdir()) == [kept.id]  # no directory left behind
    core.store.db.execute(f"PRAGMA max_page_count={pages + 1000}")
    again = core.enqueue({"name": "lost", "batch_size": 1, "max_length": 32})
    assert again.id != kept.id and [j.id for j in core.store.load_jobs()] == [kept.id, again.id]


def test_over_its_own_budget_outside_leases_fails_after_the_grace(core):
    job = _running(core, "own", 1.0, phase="load")
    job.spec["budget"] = 100 * MiB
    core.device = _device(150 * MiB)
    core.device.jobs["own"] = 150 * MiB
    core.scheduler.enforce_job_budgets(5.0)
    core.scheduler.enforce_job_budgets(9.0)
    assert job.control == "run"  # loading: transient
    job.phase = "zo_step"
    core.leases.request("own", "projection", 200 * MiB, now=0.0)
    core.leases.grant(10**12, 0.0, lambda j: 0)
    core.scheduler.enforce_job_budgets(10.0)
    core.scheduler.enforce_job_budgets(20.0)
    assert job.control == "run"  # inside a leased heavy phase: the device budget governs

    async def over() -> None:
        core.leases.release("own", "projection")
        core.scheduler.enforce_job_budgets(30.0)
        core.scheduler.enforce_job_budgets(30.5)
        assert job.control == "run"  # within the grace
        core.scheduler.enforce_job_budgets(31.5)
        for t in list(core.workers.tasks):
            t.cancel()

    asyncio.run(over())
    assert job.control == "stop" and "over its own budget of 100.0 MiB" in job.reason


class _Proc:
    def __init__(self) -> None:
        self.signals: list[str] = []

    def terminate(self) -> None:
        self.signals.append("term")

    def kill(self) -> None:
        self.signals.append("kill")


def test_a_stop_escalates_only_against_the_worker_it_was_meant_for(core):
    """A failed job retried within the cancel grace gets a new worker under the same id; the old
    worker's escalation timer must not terminate it (it did: the retried job then failed)."""
    core.cfg.cancel_grace_s = 0.01
    a, b = _running(core, "a", 1.0), _running(core, "b", 2.0)
    old, new, b_proc = _Proc(), _Proc(), _Proc()
    core.workers.procs.update({"a": old, "b": b_proc})

    async def go() -> None:
        core.fail(a, "over its own budget")
        core.cancel(b)
        core.workers.procs["a"] = new  # a was retried and restarted before its grace ran out
        await asyncio.sleep(0.1)
        for t in list(core.workers.tasks):
            t.cancel()

    asyncio.run(go())
    assert new.signals == [] and old.signals == []
    assert b_proc.signals == ["term"]  # a worker that ignores its stop is still terminated


def _worker(core: Daemon, job: Job):
    """Events as a worker sends them: each one stamped with the phase the worker is in after it."""
    tracker = PhaseTracker()

    def say(kind: str, data: dict) -> dict:
        return core.worker_event(job, kind, tracker.stamp(kind, data))
    return say


def test_after_its_last_heavy_phase_a_job_shows_it_is_finishing(core):
    """`edgezo status` showed `zo_step` at step 60/60 after the final eval; a mid-run eval still
    returns to ZO steps."""
    job = _running(core, "a", 1.0, pid=None)
    say = _worker(core, job)
    say("start", {"steps_total": 10, "resumed_from": 0, "step_phase": "zo_step"})
    say("step", {"step": 4})
    say("phase", {"phase": "eval", "state": "begin"})
    assert job.phase == "eval"
    say("phase", {"phase": "eval", "state": "end"})
    assert job.phase == "zo_step"
    say("step", {"step": 9})
    say("phase", {"phase": "eval", "state": "begin"})
    say("phase", {"phase": "eval", "state": "end"})
    assert job.phase == "export"


def test_the_daemon_shows_the_phase_the_worker_states_and_ignores_a_late_one(core):
    """No inference: a first-order job's steps are `fo_step` because its worker says so; a heartbeat
    that overtakes an event (an older statement) does not roll the phase back."""
    job = _running(core, "a", 1.0, pid=None)
    say = _worker(core, job)
    say("worker", {"pid": 1})
    assert job.phase == "load"
    say("start", {"steps_total": 3, "resumed_from": 0, "step_phase": "fo_step"})
    assert job.phase == "fo_step"
    core.heartbeat(job, {"worker_phase": "load", "phase_seq": 0})  # sent before `start`, delivered after
    assert job.phase == "fo_step"
    say("phase", {"phase": "projection", "state": "begin"})
    core.heartbeat(job, {"worker_phase": "projection", "phase_seq": 2})  # the same statement again: no change
    assert job.phase == "projection"
    with pytest.raises(ValueError, match="'worker_phase'"):
        core.heartbeat(job, {"worker_phase": ["eval"], "phase_seq": 9})
    assert job.phase == "projection"


def test_a_phase_shorter_than_the_sampling_interval_still_shows_in_the_memory_report(core):
    """CI saw a tiny job's `zo_step` stretches fall between two 0.5 s samples, so its report had no
    `zo_step` entry. No sampling loop runs here: every sample comes from a phase ending."""
    job = _running(core, "a", 1.0, pid=os.getpid())
    say = _worker(core, job)
    say("start", {"steps_total": 4, "resumed_from": 0, "step_phase": "zo_step"})
    say("step", {"step": 0})
    say("phase", {"phase": "eval", "state": "begin"})
    say("phase", {"phase": "eval", "state": "end"})
    say("phase", {"phase": "eval", "state": "begin"})  # zo_step again: sampled already
    say("phase", {"phase": "eval", "state": "end"})
    phases = [p for _, _, p in core.store.samples("a")]
    assert phases == ["zo_step", "eval"]
    assert memory_summary(core.store.samples("a"))["phases"]["zo_step"]["peak_bytes"] > 0


def test_status_and_report_give_the_same_peak_and_average_from_the_same_samples(core):
    """`edgezo status` keeps its figures incrementally, the report recomputes them from the store:
    one accumulator, so the two agree (they once used different rules)."""
    job = _running(core, "a", 1.0, pid=os.getpid())
    _worker(core, job)("start", {"steps_total": 4, "resumed_from": 0, "step_phase": "zo_step"})
    held = []
    for i in range(4):
        held.append(bytearray(8 << 20))  # the RSS moves between samples
        core.sample(time.time() + i * 0.1)
    view, report = core.job_view(job), core.memory(job)
    assert report["samples"] == 4
    assert (view["mem_peak"], view["mem_avg"]) == (report["peak_bytes"], report["avg_bytes"])
    core.accounts.forget_all()  # as after a daemon restart: rebuilt from the stored samples
    assert core.accounts.running(job.id) == (report["peak_bytes"], report["avg_bytes"])


@pytest.mark.parametrize("data, field", [
    ({"phase": ["zo_step"], "state": "begin"}, "'phase'"),
    ({"phase": "x" * 100, "state": "begin"}, "'phase'"),
    ({"phase": "eval", "state": ["end"]}, "'state'"),
    ({"step": "7"}, "'step'"),
    ({"step": True}, "'step'"),
    ({"loss": {"a": 1}}, "'loss'"),
])
def test_a_malformed_worker_event_is_refused_and_changes_nothing(core, data, field):
    """A list where a phase name belongs was stored unchecked, and the next sample's insert ended the daemon."""
    job = _running(core, "a", 1.0, pid=os.getpid())
    _worker(core, job)("start", {"steps_total": 4, "resumed_from": 0, "step_phase": "zo_step"})
    kind = "phase" if "phase" in data or "state" in data else "step"
    with pytest.raises(ValueError, match=field):
        core.worker_event(job, kind, data)
    assert job.phase == "zo_step" and job.step == 0
    core.sample(time.time())  # the store still takes this job's samples
    assert core.store.samples("a")[-1][2] == "zo_step"


def test_the_loop_logs_a_failing_iteration_and_keeps_serving(core, monkeypatch):
    """EMFILE reading /proc/meminfo, or a full disk under the store, once ended the daemon's process."""
    core.cfg.sample_s = 0.05
    real, calls = core.sample, []

    def sample(now):
        calls.append(now)
        if len(calls) <= 3:
            raise OSError(24, "Too many open files")
        real(now)

    monkeypatch.setattr(core, "sample", sample)

    class _NoServer:
        async def serve(self, sock):
            pass

        async def close(self):
            pass

    async def run_for_a_while():
        task = asyncio.create_task(core.run([], _NoServer()))
        while len(calls) < 6:
            await asyncio.sleep(0.02)
        assert core.loop_errors == 3 and core.last_loop_error == ""  # cleared by the first good iteration
        core.request_stop()
        return await task

    assert asyncio.run(asyncio.wait_for(run_for_a_while(), 20)) == 0


def test_a_job_estimated_above_the_whole_budget_is_refused_at_enqueue_with_the_numbers(core):
    """Only a declared budget was checked: one job bigger than the device waited forever, and every
    job queued after it waited behind it (issue 12, item 4)."""
    from edgezo.spec import SpecError

    with pytest.raises(SpecError) as e:
        core.enqueue({"name": "huge", "batch_size": 4096, "max_length": 2048})
    assert e.value.field == "model" and "batch_size 4096" in str(e.value) and "1000.0 MiB" in str(e.value)
    assert not core.jobs
    small = core.enqueue({"name": "fits", **FITS})
    assert small.state == "queued" and small.estimate <= 1000 * MiB
    declared = core.enqueue({"name": "mine", "batch_size": 4096, "max_length": 2048, "budget": "900MiB"})
    assert declared.estimate == 900 * MiB  # a declared budget is the job's own word


FITS = {"batch_size": 1, "max_length": 32}  # the packaged default model at this size is estimated under 1000 MiB


def _reopen(tmp_path) -> Daemon:
    d = Daemon(Config(state_dir=tmp_path / "state", socket_path=tmp_path / "s.sock", budget=1000 * MiB, reserve=0))
    d.open()
    return d


def test_a_lost_store_adopts_job_directories_and_never_reuses_their_ids(core, tmp_path):
    """A 0-byte DB started empty and reused job ids: a new job picked up an old job's seed-log and was
    'done' with 0 steps (issue 12, item 5)."""
    first = core.enqueue({"name": "rt", **FITS})
    assert first.id == "rt-1"
    old = core.enqueue({"name": "rt", **FITS})  # a directory from before job.json existed
    core.cancel(core.enqueue({"name": "rt", **FITS}))
    (Path(old.job_dir) / "job.json").unlink()
    core.store.close()
    fcntl.flock(core._lock_fd, fcntl.LOCK_UN)
    for f in (tmp_path / "state").glob("edgezo.db*"):
        f.unlink()
    (tmp_path / "state" / "edgezo.db").write_bytes(b"")
    d = _reopen(tmp_path)
    try:
        restored = d.jobs["rt-1"]  # its job.json is what the daemon acknowledged: queued, it runs as asked
        assert restored.state == "queued" and [e["kind"] for e in d.store.events("rt-1")] == ["restored"]
        assert d.jobs["rt-3"].state == "cancelled"
        adopted = d.jobs["rt-2"]
        assert adopted.state == "failed" and "adopted from its job directory" in adopted.reason
        assert [e["kind"] for e in d.store.events("rt-2")] == ["adopted"]
        assert d.enqueue({"name": "rt", **FITS}).id == "rt-4"
    finally:
        d.store.close()


def test_a_change_the_store_lost_comes_back_from_the_job_directory(core, tmp_path):
    """A flipped byte in the WAL makes SQLite drop that commit and all later ones without a word: an
    acknowledged cancel came back undone (issue 12, item 5). Here the store loses the cancel's commit."""
    job = core.enqueue({"name": "rt", **FITS})
    before = dataclasses.replace(job, spec=dict(job.spec))
    core.cancel(job)
    assert job.state == "cancelled" and job.version > before.version
    core.store.save_job(before)  # the store rolled back to before the cancel
    core.store.close()
    fcntl.flock(core._lock_fd, fcntl.LOCK_UN)
    d = _reopen(tmp_path)
    try:
        assert d.jobs["rt-1"].state == "cancelled"
        assert "restored" in [e["kind"] for e in d.store.events("rt-1")]
        assert d.store.load_jobs()[0].state == "cancelled"  # and the store is corrected
    finally:
        d.store.close()


def test_a_damaged_store_is_refused_with_a_copy_kept(core, tmp_path):
    core.enqueue({"name": "rt", **FITS})
    core.store.close()
    fcntl.flock(core._lock_fd, fcntl.LOCK_UN)
    db = tmp_path / "state" / "edgezo.db"
    raw = bytearray(db.read_bytes())
    raw[4096:8192] = os.urandom(4096)  # a page of the jobs table
    db.write_bytes(bytes(raw))
    for f in (tmp_path / "state").glob("edgezo.db-*"):
        f.unlink()
    with pytest.raises(SystemExit) as e:
        _reopen(tmp_path)
    assert "is damaged" in str(e.value) and "edgezo retry" in str(e.value)
    copies = list((tmp_path / "state").glob("edgezo.db.damaged-*/edgezo.db"))
    assert len(copies) == 1 and copies[0].read_bytes() == bytes(raw)


@pytest.fixture
def open_dir():
    """A directory everyone may search (pytest's tmp_path sits under a 0700 one)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="edgezo-access-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_files_a_caller_could_not_read_are_refused_at_enqueue(core, open_dir):
    """The worker opened data paths with the daemon's privileges and its errors echoed their content:
    a socket-group member could read files only the daemon's user may (issue 12, item 3)."""
    from daemon.access import readable_by
    from edgezo.spec import SpecError

    other = 65534 if os.geteuid() != 65534 else 65533  # nobody
    public, private = open_dir / "public.jsonl", open_dir / "private.jsonl"
    for f, mode in ((public, 0o644), (private, 0o600)):
        f.write_text('{"text": "fine", "label": 1}\n')
        f.chmod(mode)
    closed = open_dir / "closed"
    closed.mkdir(mode=0o700)
    (closed / "rows.jsonl").write_text('{"text": "fine", "label": 1}\n')
    (closed / "rows.jsonl").chmod(0o644)
    link = open_dir / "link.jsonl"
    link.symlink_to(private)
    assert readable_by(public, other) and not readable_by(private, other)
    assert not readable_by(closed / "rows.jsonl", other) and not readable_by(closed, other)
    assert not readable_by(link, other) and not readable_by(open_dir / "missing", other)
    assert readable_by(private, 0)  # root reads everything
    for path in (private, link, closed / "rows.jsonl"):
        with pytest.raises(SpecError) as e:
            core.enqueue({"name": "peek", **FITS, "task": {"train": str(path)}}, owner_uid=other)
        assert e.value.field == "task.train" and f"uid {other}" in str(e.value)
    assert not core.jobs
    ok = core.enqueue({"name": "mine", **FITS, "task": {"train": str(public)}}, owner_uid=other)
    assert ok.state == "queued"
    if os.geteuid() == 0:  # a file the caller owns is theirs to read, whatever its group or others bits say
        os.chown(private, other, -1)
        assert readable_by(private, other)


def test_the_store_is_readable_by_the_daemons_user_only(core, tmp_path):
    """It was 0644: every spec and failure reason, world-readable (issue 12, item 3)."""
    core.enqueue({"name": "rt", **FITS})
    files = list((tmp_path / "state").glob("edgezo.db*"))
    assert {f.name for f in files} >= {"edgezo.db", "edgezo.db-wal"}
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_the_daemon_never_imports_torch():
    """The daemon runs for weeks next to the jobs it schedules: importing torch would cost it hundreds
    of MiB of the memory it hands out. Every daemon module, and the CLI's daemon commands, stay torch-free."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, daemon, edgezo.daemon_cli\n"
            "for m in pkgutil.iter_modules(daemon.__path__): importlib.import_module('daemon.' + m.name)\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules)\n"
            "assert not heavy, heavy")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
