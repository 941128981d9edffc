"""The guard's held-out watch: a job never hands back weights that score worse, on train sentences
kept out of training, than the best it checked (its start included) — and resume and replay follow
every return it made."""

from __future__ import annotations

import json

import pytest

from edgezo.guard import END, HELD_OUT, DivergenceGuard, Rollback, split_held_out
from edgezo.spec import SpecError, load_spec
from edgezo.testing.tiny import PauseAt, job_weights, make_job, replayed, same_tensors
from edgezo.trainer import Paused, run_job


def _events(job, kind):
    return [e for e in map(json.loads, (job / "events.jsonl").read_text().splitlines()) if e["kind"] == kind]


# -- the decisions, pure ----------------------------------------------------------------------------


def test_held_out_rows_come_after_the_pool_or_off_the_end_and_never_more_than_a_fifth():
    rows = list(range(100))
    assert split_held_out(rows, 40, 10) == (rows[:40], rows[40:50])  # room after the pool: training unchanged
    assert split_held_out(rows, None, 10) == (rows[:90], rows[90:])  # the whole split trains: its tail is kept out
    assert split_held_out(rows, 95, 10) == (rows[:90], rows[90:])  # no room after the pool
    assert split_held_out(rows, None, 256) == (rows[:80], rows[80:])  # a fifth at most
    assert split_held_out(rows, 30, 0) == (rows[:30], [])


def _guard() -> DivergenceGuard:
    return DivergenceGuard(rise=0.0, span=4, lr_factor=0.5, drop=0.02)


def test_a_check_that_falls_below_the_best_returns_there_at_a_lower_lr():
    g = _guard()
    assert g.check(0.70, 0.60) is None  # the start (step -1)
    for s in range(10):
        g.observe(s, 0.5)
    assert g.check(0.75, 0.50) is None
    for s in range(10, 20):
        g.observe(s, 0.5)
    assert g.check(0.74, 0.49) is None  # within `drop` of the best: keep going
    for s in range(20, 30):
        g.observe(s, 0.5)
    rb = g.check(0.70, 0.48)
    assert rb == Rollback(at=29, to=9, lr_scale=0.5, cause=HELD_OUT)
    g.rolled_back(rb)
    assert g.at == 9 and sorted(g.checks) == [-1, 9]  # the checks of steps 10..29 no longer exist
    for s in range(30, 40):
        g.observe(s, 0.5)
    assert g.check(0.745, 0.47) is None
    assert g.settle() == Rollback(at=39, to=9, lr_scale=0.5, cause=END)  # the end: back to the best, lr kept


def test_the_start_is_a_candidate_and_a_loss_rollback_forgets_checks_it_undoes():
    g = _guard()
    g.check(0.70, 0.60)
    for s in range(10):
        g.observe(s, 0.5)
    g.check(0.80, 0.40)
    g.rolled_back(Rollback(at=15, to=5, lr_scale=0.5))  # the loss watch went back before step 9's check
    assert sorted(g.checks) == [-1]
    g.observe(16, 0.5)
    assert g.settle().to == -1  # the only weights still reachable that were checked: the start
    h = _guard()
    h.check(0.70, 0.60)
    h.observe(0, 0.5)
    h.check(0.70, 0.55)  # equal accuracy, lower loss: better
    assert h.settle() is None and h.best_check().step == 0


# -- on the tiny model -------------------------------------------------------------------------------

# lr 3 on every weight overshoots; the loss watch is off, so only the held-out watch can notice
DRIFTING = dict(method="fzoo", trainable="full", steps=24, eval_size=16, eval_every=0, snapshot_every=0,
                optim={"lr": 3.0, "eps": 1e-3, "perturbations": 4},
                guard={"rise": 0, "held_out": 12, "check_every": 4, "drop": 0.0})


def _score_held_out(job) -> float:
    """The held-out accuracy of the model a job exported, scored afresh from its output directory."""
    from edgezo.data import read_rows
    from edgezo.tasks import make_task
    from edgezo.trainer import build_engine

    spec = json.loads((job / "spec.json").read_text())
    engine = build_engine(load_spec({**spec, "model": str(job / spec["output"])}))
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"], engine.device)
    _, held = split_held_out(read_rows(spec["task"]["train"], "t"), spec["task"]["train_size"], spec["guard"]["held_out"])
    return task.evaluate(task.encode(held, "t"), spec["batch_size"])["accuracy"]


def test_a_drifting_job_ends_on_its_best_held_out_check_and_replay_follows(tmp_path, tiny_spec_dict):
    job = make_job(tmp_path, tiny_spec_dict, **DRIFTING)
    report = run_job(job)
    checks, rollbacks = _events(job, "check"), _events(job, "rollback")
    assert checks[0]["step"] == -1 and checks[0]["n"] == 12
    assert any(c["accuracy"] < checks[0]["accuracy"] for c in checks), "lr 3 should have drifted below the start"
    assert rollbacks and {r["cause"] for r in rollbacks} <= {HELD_OUT, END}
    h = report["guard"]["held_out"]
    assert h["end"] == max(c["accuracy"] for c in checks) and h["end"] >= h["start"]
    assert _score_held_out(job) == h["end"]  # what it exported is the best checked model
    assert same_tensors(job_weights(job), replayed(tmp_path, job))
    again = make_job(tmp_path, tiny_spec_dict, name="again", **DRIFTING)
    run_job(again)  # deterministic, returns included
    assert same_tensors(job_weights(job), job_weights(again))

    unguarded = make_job(tmp_path, tiny_spec_dict, name="unguarded", **{**DRIFTING, "guard": {"rise": 0, "held_out": 0}})
    free = run_job(unguarded)
    assert free["guard"]["held_out"] is None
    assert report["metrics"]["final"]["loss"] < free["metrics"]["final"]["loss"]


def test_resume_across_a_held_out_return_equals_an_uninterrupted_run(tmp_path, tiny_spec_dict):
    ref = make_job(tmp_path, tiny_spec_dict, name="ref", **DRIFTING)
    run_job(ref)
    first = next(r["step"] for r in _events(ref, "rollback"))
    job = make_job(tmp_path, tiny_spec_dict, name="paused", **DRIFTING)
    with pytest.raises(Paused):
        run_job(job, PauseAt(min(first + 2, DRIFTING["steps"] - 1)))
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert [(e["step"], e["to"]) for e in _events(job, "rollback")] == [(e["step"], e["to"]) for e in _events(ref, "rollback")]


def test_the_report_says_what_the_guard_did(tmp_path, tiny_spec_dict):
    from edgezo.report import render

    job = make_job(tmp_path, tiny_spec_dict, **DRIFTING)
    text = render(run_job(job))
    assert "held-out   12 train sentences kept out of training" in text
    assert "the job ends on its best held-out check" in text or "the held-out score fell" in text


def test_held_out_fields_are_checked_and_off_where_nothing_can_be_replayed(tiny_spec_dict):
    for bad, field in (({"guard": {"held_out": -1}}, "guard.held_out"), ({"guard": {"check_every": 1.5}},
                                                                          "guard.check_every"),
                       ({"guard": {"drop": 2}}, "guard.drop"),
                       ({"method": "fo", "trainable": "lora", "guard": {"held_out": 64}}, "guard.held_out")):
        with pytest.raises(SpecError) as e:
            load_spec({**tiny_spec_dict, **bad})
        assert e.value.field == field
    assert load_spec({**tiny_spec_dict, "method": "fo", "trainable": "lora"})["guard"]["held_out"] == 0


def test_a_job_written_before_the_held_out_watch_resumes_without_it(tmp_path, tiny_spec_dict):
    """Its spec.json has no guard.held_out: it ran without checks, and its seed-log's spec hash must
    still match, so it continues as it was rather than being refused."""
    import hashlib

    from edgezo.spec import read_job_spec, spec_hash

    job = make_job(tmp_path, tiny_spec_dict, steps=4)
    spec = json.loads((job / "spec.json").read_text())
    for k in ("held_out", "check_every", "drop"):
        del spec["guard"][k]
    (job / "spec.json").write_text(json.dumps(spec))
    again = read_job_spec(job)
    assert again["guard"]["held_out"] == 0
    keep = {k: v for k, v in spec.items() if k not in ("name", "window", "budget", "output", "fsync_every", "noise",
                                                       "snapshot", "hizoo", "pseuzo", "from_log")}
    keep["optim"] = {k: v for k, v in keep["optim"].items() if k not in ("directions", "rank")}
    keep["task"] = {k: v for k, v in keep["task"].items() if k != "train_size"}
    old = hashlib.sha256(json.dumps(keep, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert spec_hash(again) == old
