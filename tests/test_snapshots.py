"""Snapshots sized by cost: taken when a replay would cost too much, only the newest kept, never one
deleted before its successor is on disk (issue 14, item 2)."""

from __future__ import annotations

import json

import pytest

from edgezo import seedlog
from edgezo.cli import main as cli_main
from edgezo.report import render
from edgezo.spec import SpecError, load_spec
from edgezo.testing.tiny import PauseAt, job_weights, replayed, same_tensors
from edgezo.trainer import Paused, prepare_job_dir, run_job

NO_EVAL = {"eval_size": 0}
EVERY_STEP = {"snapshot": {"replay_s": 1e-9}}  # any update takes longer: a snapshot after every step
FO = {"method": "fo", "optim": {"lr": 1e-2, "weight_decay": 0.01}}


def _job(tmp_path, spec_dict, name="job", **overrides):
    return prepare_job_dir(tmp_path / name, load_spec({**spec_dict, **NO_EVAL, **overrides}))


def _snapshot_records(job) -> list[int]:
    _, frames = seedlog.read(job / "seedlog.ezl")
    return [f.data["step"] for f in frames if f.kind == seedlog.SNAPSHOT]


def _files(job) -> list[str]:
    return sorted(p.name for p in (job / "snapshots").iterdir())


def test_a_job_short_enough_to_replay_in_seconds_takes_no_snapshot(tmp_path, tiny_spec_dict):
    job = _job(tmp_path, tiny_spec_dict, steps=8)  # the default rule: replay_s 60
    report = run_job(job)
    assert _snapshot_records(job) == [] and _files(job) == []
    disk = report["disk"]
    assert disk["snapshots"] == 0 and disk["snapshot_bytes"] == 0
    assert disk["output_bytes"] > 0 and disk["seedlog_bytes"] > 0
    assert disk["total_bytes"] == disk["output_bytes"] + disk["seedlog_bytes"] + disk["other_bytes"]
    assert "disk" in render(report) and "0 snapshots" in render(report)


def test_snapshots_by_replay_cost_keep_only_the_newest_and_replay_stays_exact(tmp_path, tiny_spec_dict):
    job = _job(tmp_path, tiny_spec_dict, steps=8, **EVERY_STEP)
    run_job(job)
    assert _snapshot_records(job) == list(range(7))  # after every step but the last
    assert _files(job) == ["step-00000006.safetensors"]  # keep: 1
    trained = job_weights(job)
    assert cli_main(["replay", str(job), "--out", str(tmp_path / "from-snapshot")]) == 0
    from safetensors.torch import load_file

    from_snapshot = {}
    for f in (tmp_path / "from-snapshot").glob("*.safetensors"):
        from_snapshot.update(load_file(str(f)))
    assert same_tensors(trained, from_snapshot)
    assert same_tensors(trained, replayed(tmp_path, job))  # the seed-log alone still rebuilds it
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    snaps = [e for e in events if e["kind"] == "snapshot"]
    assert len(snaps) == 7 and all(e["bytes"] > 0 and e["replay_s"] > 1e-9 for e in snaps)
    assert [e["deleted"] for e in snaps] == [0] + [1] * 6


def test_keep_two_every_two_steps(tmp_path, tiny_spec_dict):
    job = _job(tmp_path, tiny_spec_dict, steps=9, snapshot_every=2, snapshot={"keep": 2})
    run_job(job)
    assert _snapshot_records(job) == [1, 3, 5, 7]
    assert _files(job) == ["step-00000005.safetensors", "step-00000007.safetensors"]


def test_resume_from_the_only_kept_snapshot_equals_an_uninterrupted_run(tmp_path, tiny_spec_dict):
    ref = _job(tmp_path, tiny_spec_dict, name="ref", steps=10, **EVERY_STEP)
    run_job(ref)
    job = _job(tmp_path, tiny_spec_dict, name="paused", steps=10, **EVERY_STEP)
    with pytest.raises(Paused):
        run_job(job, PauseAt(6))
    assert _files(job) == ["step-00000005.safetensors"]
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert _files(job) == ["step-00000008.safetensors"]


def test_a_crash_while_a_snapshot_is_recorded_keeps_the_previous_one(tmp_path, tiny_spec_dict, monkeypatch):
    """The old snapshot goes only once the new one's seed-log record is synced: killed in between,
    the log still points at a snapshot that exists, and the resumed run ends where it should."""
    kw = dict(steps=8, snapshot_every=2)
    ref = _job(tmp_path, tiny_spec_dict, name="ref", **kw)
    run_job(ref)
    job = _job(tmp_path, tiny_spec_dict, name="crash", **kw)
    append = seedlog.SeedLogWriter.append
    recorded = []

    def dies_at_the_second_record(self, kind, data, **kw):
        if kind == seedlog.SNAPSHOT:
            recorded.append(data["step"])
            if len(recorded) == 2:
                raise OSError("power lost")
        return append(self, kind, data, **kw)

    monkeypatch.setattr(seedlog.SeedLogWriter, "append", dies_at_the_second_record)
    with pytest.raises(OSError, match="power lost"):
        run_job(job)
    monkeypatch.undo()
    assert _snapshot_records(job) == [1]
    assert _files(job) == ["step-00000001.safetensors", "step-00000003.safetensors"]  # not yet pruned
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert _files(job) == ["step-00000005.safetensors"]


def test_fo_keeps_only_its_newest_snapshot_and_resumes_from_it(tmp_path, tiny_spec_dict):
    kw = dict(FO, steps=10, snapshot_every=2)
    ref = _job(tmp_path, tiny_spec_dict, name="ref", **kw)
    run_job(ref)
    job = _job(tmp_path, tiny_spec_dict, name="fo", **kw)
    with pytest.raises(Paused):
        run_job(job, PauseAt(7))
    assert _files(job) == ["optim-00000005.safetensors", "step-00000005.safetensors"]
    report = run_job(job)
    assert report["timing"]["steps_this_run"] == 4  # steps 6..9: from the newest snapshot on
    assert same_tensors(job_weights(ref), job_weights(job))


def test_fo_snapshots_by_the_time_its_steps_take(tmp_path, tiny_spec_dict):
    """fo cannot replay, so the redo is rerunning steps: with the cost rule it still snapshots."""
    job = _job(tmp_path, tiny_spec_dict, steps=5, **FO, **EVERY_STEP)
    run_job(job)
    assert _snapshot_records(job) == [0, 1, 2, 3]
    assert _files(job) == ["optim-00000003.safetensors", "step-00000003.safetensors"]


@pytest.mark.parametrize("given, field", [
    ({"snapshot": {"keep": 0}}, "snapshot.keep"),
    ({"snapshot": {"keep": 1.5}}, "snapshot.keep"),
    ({"snapshot": {"replay_s": 0}}, "snapshot.replay_s"),
    ({"snapshot": {"replay_s": "soon"}}, "snapshot.replay_s"),
    ({"snapshot": {"every": 3}}, "snapshot.every"),
    ({"snapshot": 5}, "snapshot"),
    ({"snapshot_every": -1}, "snapshot_every"),
])
def test_snapshot_fields_are_checked_naming_the_field(tiny_spec_dict, given, field):
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, **given})
    assert e.value.field == field


def test_the_snapshot_policy_does_not_change_the_spec_hash(tiny_spec_dict):
    """Keeping more or fewer never changes the weights, so a job may resume under another policy."""
    from edgezo.spec import spec_hash

    a = load_spec(tiny_spec_dict)
    b = load_spec({**tiny_spec_dict, "snapshot": {"keep": 3, "replay_s": 5}})
    assert spec_hash(a) == spec_hash(b)
    assert a["snapshot_every"] is None and a["snapshot"] == {"keep": 1, "replay_s": 60.0}
