"""The guard's held-out watch: a job never hands back weights that score worse, on train sentences
kept out of training, than the best it checked (its start included) — and resume and replay follow
every return it made."""

from __future__ import annotations

import json

import pytest

from edgezo.guard import END, HELD_OUT, DivergenceGuard, Rollback, split_held_out
from edgezo.spec import SpecError, load_spec
from edgezo.testing.tiny import PauseAt, job_events, job_weights, make_job, replayed, same_tensors
from edgezo.trainer import Paused, run_job

# -- the decisions, pure ----------------------------------------------------------------------------


def test_held_out_rows_come_after_the_pool_or_off_the_end_and_never_more_than_a_fifth():
    rows = list(range(100))
    assert split_held_out(rows, 40, 10) == (rows[:40], rows[40:50])  # room after the pool: training unchanged
    assert split_held_out(rows, None, 10) == (rows[:90], rows[90:])  # the whole split trains: its tail is kept out
    assert split_held_out(rows, 95, 10) == (rows[:90], rows[90:])  # no room after the pool
    assert split_held_out(rows, None, 256) == (rows[:80], rows[80:])  # a fifth at most
    assert split_held_out(rows, 30, 0) == (rows[:30], [])


def _guard() -> DivergenceGuard:
    return DivergenceGuard(rise=0.0, span=4, lr_factor=0.5, z=1.96)


def hits(right: range | set, n: int = 100) -> str:
    """A check's per-sentence record: which of n held-out sentences it got right."""
    return "".join("1" if i in right else "0" for i in range(n))


def test_a_check_worse_than_the_best_beyond_noise_returns_there_at_a_lower_lr():
    g = _guard()
    assert g.check(0.70, 0.60, hits(range(70))) is None  # the start (step -1)
    for s in range(10):
        g.observe(s, 0.5)
    assert g.check(0.75, 0.50, hits(range(75))) is None
    for s in range(10, 20):
        g.observe(s, 0.5)
    # 4 sentences lost, 1 gained against the best: 3 < 1.96·√5, noise
    assert g.check(0.72, 0.49, hits(set(range(71)) | {80})) is None
    for s in range(20, 30):
        g.observe(s, 0.5)
    rb = g.check(0.60, 0.48, hits(range(60)))  # 15 lost, none gained: 15 > 1.96·√15
    assert rb == Rollback(at=29, to=9, lr_scale=0.5, cause=HELD_OUT)
    g.rolled_back(rb)
    assert g.at == 9 and sorted(g.checks) == [-1, 9]  # the checks of steps 10..29 no longer exist
    for s in range(30, 40):
        g.observe(s, 0.5)
    assert g.check(0.73, 0.47, hits(range(73))) is None
    assert g.settle() is None  # the end: the last weights stay, 2 sentences behind the best is noise


def test_the_end_returns_to_the_best_check_when_the_last_is_worse_or_below_the_start():
    g = _guard()
    g.check(0.70, 0.60, hits(range(70)))
    g.observe(0, 0.5)
    g.check(0.90, 0.30, hits(range(90)))
    g.observe(1, 0.5)
    g.check(0.80, 0.40, hits(range(80)))  # 10 lost: worse, but the check's own return is the trainer's to take
    assert g.settle() == Rollback(at=1, to=0, lr_scale=1.0, cause=END)  # the end: back, lr kept
    h = _guard()
    h.check(0.70, 0.60, hits(range(70)))
    h.observe(0, 0.5)
    h.check(0.69, 0.61, hits(range(69)))  # one sentence behind the start: noise, but below it
    assert h.settle() == Rollback(at=0, to=-1, lr_scale=1.0, cause=END)  # never below the start
    k = _guard()
    k.check(0.70, 0.60, hits(range(70)))
    k.observe(0, 0.5)
    k.check(0.70, 0.55, hits(range(70)))  # equal accuracy, lower loss: the best check, but no gain shown
    assert k.best_check().step == 0 and k.settle() == Rollback(at=0, to=-1, lr_scale=1.0, cause=END)


def test_the_end_keeps_only_a_gain_beyond_noise():
    """HiZOO on top1 (a real run): 22 held-out sentences gained, 17 lost against the start, z 0.6:
    the job ends on its start. The default job's run: 26 gained, 13 lost, z 1.9: it keeps its weights."""
    start = hits(range(100), 200)  # 100 of 200 held-out sentences right
    for gained, lost, keeps in ((22, 17, False), (26, 13, True), (3, 0, True), (2, 0, False)):
        g = _guard()
        g.check(0.5, 0.6, start)
        g.observe(0, 0.5)
        g.check((100 - lost + gained) / 200, 0.5, hits(set(range(lost, 100)) | set(range(100, 100 + gained)), 200))
        assert (g.settle() is None) is keeps, (gained, lost)


def test_a_loss_rollback_forgets_the_checks_it_undoes():
    g = _guard()
    g.check(0.70, 0.60, hits(range(70)))
    for s in range(10):
        g.observe(s, 0.5)
    g.check(0.80, 0.40, hits(range(80)))
    g.rolled_back(Rollback(at=15, to=5, lr_scale=0.5))  # the loss watch went back before step 9's check
    assert sorted(g.checks) == [-1]
    g.observe(16, 0.5)
    g.check(0.60, 0.70, hits(range(60)))
    assert g.settle().to == -1  # the only weights still reachable that were checked: the start


def test_without_per_sentence_hits_the_unpaired_error_of_the_checks_n_decides():
    g = _guard()
    g.check(0.50, 1.0, n=256)  # generation: token F1, no per-sentence record
    g.observe(0, 0.5)
    assert g.check(0.49, 1.0, n=256) is None  # a point below, within the noise of 256 sentences
    g.observe(1, 0.5)
    assert g.check(0.30, 1.0, n=256).cause == HELD_OUT
    # the noise is that of the sentences actually scored: 10 points down is noise at 32, not at 2,000
    for n, worse in ((32, False), (2000, True)):
        g = _guard()
        g.check(0.50, 1.0, n=n)
        g.observe(0, 0.5)
        assert (g.check(0.40, 1.0, n=n) is not None) is worse, n


# -- on the tiny model -------------------------------------------------------------------------------

# The held-out sentences disagree with the training ones (their labels are flipped, a shift between
# what trains and what the user cares about): as the model learns the training rows, it gets the
# held-out ones wrong, clearly, and only the held-out watch can see it (the loss watch is off).
DRIFTING = dict(method="fzoo", trainable="top1", steps=30, eval_size=16, eval_every=0, snapshot_every=0,
                optim={"lr": 0.05, "eps": 1e-3, "perturbations": 8},
                guard={"rise": 0, "held_out": 40, "check_every": 5})


@pytest.fixture
def drifting(tiny_spec_dict, tmp_path):
    from edgezo.testing.tiny import write_reviews

    train = write_reviews(tmp_path / "data" / "train200.jsonl", 200, seed=3)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for row in rows[160:]:  # the last 40 rows are the held-out ones
        row["label"] = {"fresh": "rotten", "rotten": "fresh"}[row["label"]]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {**tiny_spec_dict, **DRIFTING, "task": {**tiny_spec_dict["task"], "train": str(train)}}


def _score_held_out(job, n: int = 40) -> float:
    """The held-out accuracy of the model a job exported, scored afresh from its output directory."""
    from edgezo.data import read_rows
    from edgezo.tasks import make_task
    from edgezo.trainer import build_engine

    spec = json.loads((job / "spec.json").read_text())
    engine = build_engine(load_spec({**spec, "model": str(job / spec["output"]), "trainable": "full"}))
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"], engine.device)
    _, held = split_held_out(read_rows(spec["task"]["train"], "t"), spec["task"]["train_size"], n)
    return task.evaluate(task.encode(held, "t"), spec["batch_size"])["accuracy"]


def test_a_drifting_job_goes_back_and_never_ends_below_its_start_and_replay_follows(tmp_path, drifting):
    job = make_job(tmp_path, drifting)
    report = run_job(job)
    checks, rollbacks = job_events(job, "check"), job_events(job, "rollback")
    assert checks[0]["step"] == -1 and checks[0]["n"] == 40
    assert any(r["cause"] == HELD_OUT for r in rollbacks), "the held-out score should have fallen clearly"
    h = report["guard"]["held_out"]
    assert h["end"] >= h["start"]
    assert _score_held_out(job) == h["end"]  # what it exported is what the guard scored last
    assert same_tensors(job_weights(job), replayed(tmp_path, job))
    again = make_job(tmp_path, drifting, name="again")
    run_job(again)  # deterministic, returns included
    assert same_tensors(job_weights(job), job_weights(again))

    same_rows = {**drifting["task"], "train_size": 160}  # the same 160 training rows, nothing held out
    unguarded = make_job(tmp_path, {**drifting, "guard": {"rise": 0, "held_out": 0}, "task": same_rows},
                         name="unguarded")
    free = run_job(unguarded)
    assert free["guard"]["held_out"] is None
    assert _score_held_out(unguarded) < h["start"] <= h["end"]  # unguarded, it ends below its start


def test_resume_across_a_held_out_return_equals_an_uninterrupted_run(tmp_path, drifting):
    ref = make_job(tmp_path, drifting, name="ref")
    run_job(ref)
    first = next(r["step"] for r in job_events(ref, "rollback"))
    job = make_job(tmp_path, drifting, name="paused")
    with pytest.raises(Paused):
        run_job(job, PauseAt(min(first + 2, DRIFTING["steps"] - 1)))
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert [(e["step"], e["to"]) for e in job_events(job, "rollback")] == [(e["step"], e["to"]) for e in job_events(ref, "rollback")]


def test_the_report_says_what_the_guard_did(tmp_path, drifting):
    from edgezo.report import render

    job = make_job(tmp_path, drifting)
    text = render(run_job(job))
    assert "held-out   40 train sentences kept out of training" in text
    assert "the held-out score fell" in text


def test_held_out_fields_are_checked_and_off_where_nothing_can_be_replayed(tiny_spec_dict):
    for bad, field in (({"guard": {"held_out": -1}}, "guard.held_out"), ({"guard": {"check_every": 1.5}},
                                                                          "guard.check_every"),
                       ({"guard": {"z": -1}}, "guard.z"),
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
    for k in ("held_out", "check_every", "z"):
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


def test_the_loss_watch_does_not_trip_on_batch_noise_but_does_on_a_divergence():
    """Step losses scatter (±0.14 around 0.42 for 16-sentence batches of the default job): over
    thousands of steps the best average is itself a low excursion, and a bare 25 % rise over it once
    tripped every few dozen steps at lr ~0. A real divergence is far beyond the noise."""
    import random

    rng = random.Random(0)
    g = DivergenceGuard(rise=0.25, span=40, lr_factor=0.5)
    trips = []
    for s in range(6000):
        rb = g.observe(s, max(0.01, rng.gauss(0.42, 0.14)))
        if rb is not None:  # what the trainer does: back, and on at a lower lr
            trips.append(s)
            g.rolled_back(rb)
    assert trips == []  # a bare 25 % rise over the best average: 574 trips here
    d = DivergenceGuard(rise=0.25, span=40, lr_factor=0.5)
    losses = [max(0.01, rng.gauss(0.42, 0.14)) * (1.0 if s < 300 else 1.01 ** (s - 300)) for s in range(600)]
    trip = next(s for s, loss in enumerate(losses) if d.observe(s, loss) is not None)
    assert 300 < trip < 400 and d.pending.to < 300  # caught within 100 steps, back to before it began


def test_a_check_a_few_sentences_behind_a_lucky_best_is_not_worse():
    """The best of many checks is a lucky one: 4 sentences lost and none gained against it (z 2.0
    uncorrected) sent a 5,500-step run back 7 times. Continuity-corrected and with z raised for the
    number of checks the best was picked from, it is noise; 20 lost is not."""
    g = _guard()
    for s in range(-1, 40):
        if s >= 0:
            g.observe(s, 0.5)
        assert g.check(0.80, 0.40, hits(range(80))) is None  # 41 equal checks: the first is the best
    g.observe(40, 0.5)
    assert g.check(0.76, 0.41, hits(range(76))) is None
    g.observe(41, 0.5)
    assert g.check(0.60, 0.50, hits(range(60))).cause == HELD_OUT


def test_the_report_gives_the_held_out_score_of_the_weights_the_job_ended_on():
    """PseuZO on top1 (a real run): its check at step 299 fell, the job went back to step 199 and ran
    out of time there. The report said it ended at 73.4 % (step 299's check); it ended on step 199's."""
    from edgezo.trainer import held_out_summary

    def check(step, acc):
        return {"kind": "check", "step": step, "accuracy": acc, "n": 256}

    trail = [check(-1, 0.766), check(99, 0.812), check(199, 0.816), check(299, 0.734),
             {"kind": "rollback", "step": 299, "to": 199, "cause": "held_out"}]
    assert held_out_summary(trail) == {"n": 256, "checks": 4, "start": 0.766, "end": 0.816, "end_step": 199}
    back_to_start = [*trail[:2], {"kind": "rollback", "step": 99, "to": -1, "cause": "end"}]
    assert held_out_summary(back_to_start)["end_step"] == -1
    assert held_out_summary(trail[:3])["end_step"] == 199
