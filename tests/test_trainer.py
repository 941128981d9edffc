"""The recipe end to end on a tiny model: report, replay, kill -9 and resume, spec errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from edgezo.cli import main as cli_main
from edgezo.spec import SpecError, load_spec
from edgezo.testing.tiny import job_weights, make_job, same_tensors
from edgezo.trainer import run_job

REPO = Path(__file__).resolve().parent.parent



_weights, _same = job_weights, same_tensors


def test_run_writes_report_with_metrics_and_memory(tmp_path, tiny_spec_dict):
    job = make_job(tmp_path, tiny_spec_dict)
    report = run_job(job)
    on_disk = json.loads((job / "report.json").read_text())
    assert on_disk["status"] == "done" and on_disk["steps_done"] == 6
    assert on_disk["noise"] == "torch"  # auto on the CPU
    assert 0.0 <= on_disk["metrics"]["zero_shot"]["accuracy"] <= 1.0
    assert on_disk["metrics"]["final"]["n"] == 16
    mem = report["memory"]
    assert mem["peak_bytes"] >= mem["avg_bytes"] > 0
    assert {"zo_step", "eval"} <= set(mem["phases"])
    assert (job / "seedlog.ezl").stat().st_size > 0 and _weights(job)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_replay_rebuilds_trained_weights_bit_for_bit(tmp_path, tiny_spec_dict, precision):
    job = make_job(tmp_path, tiny_spec_dict, precision=precision, steps=9, snapshot_every=4, eval_size=0)
    run_job(job)
    trained = _weights(job)
    for flag, out in (([], "replayed"), (["--from-base"], "from-base")):
        assert cli_main(["replay", str(job), "--out", str(tmp_path / out), *flag]) == 0
        replayed = {}
        for f in (tmp_path / out).glob("*.safetensors"):
            replayed.update(load_file(str(f)))
        assert _same(trained, replayed), f"replay {flag} differs"


def test_fixed_seed_reproduces_bit_for_bit(tmp_path, tiny_spec_dict):
    a = make_job(tmp_path, tiny_spec_dict, name="a", eval_size=0)
    b = make_job(tmp_path, tiny_spec_dict, name="b", eval_size=0)
    run_job(a)
    run_job(b)
    assert _same(_weights(a), _weights(b))
    c = make_job(tmp_path, tiny_spec_dict, name="c", eval_size=0, seed=1)
    run_job(c)
    assert not _same(_weights(a), _weights(c))


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path, tiny_spec_dict):
    steps = 120
    ref = make_job(tmp_path, tiny_spec_dict, name="ref", steps=steps, eval_size=0, snapshot_every=25)
    run_job(ref)

    killed = make_job(tmp_path, tiny_spec_dict, name="killed", steps=steps, eval_size=0, snapshot_every=25)
    kill_at = random.Random().randint(5, 60)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "edgezo.cli", "resume", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = killed / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if events.exists() and events.read_text().count('"kind": "step"') >= kill_at:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "report.json").exists(), "the run finished before it could be killed"

    run_job(killed)  # resume from the seed-log
    assert _same(_weights(ref), _weights(killed)), f"resume after SIGKILL near step {kill_at} diverged"
    assert json.loads((killed / "report.json").read_text())["steps_done"] == steps


def test_torn_log_tail_resumes_from_the_last_intact_step(tmp_path, tiny_spec_dict):
    ref = make_job(tmp_path, tiny_spec_dict, name="ref", steps=8, eval_size=0)
    run_job(ref)
    job = make_job(tmp_path, tiny_spec_dict, name="torn", steps=8, eval_size=0)
    run_job(job)
    log = job / "seedlog.ezl"
    log.write_bytes(log.read_bytes()[:-9])  # the last step's frame is torn
    (job / "report.json").unlink()
    from edgezo.seedlog import TornRecordWarning

    with pytest.warns(TornRecordWarning):
        run_job(job)
    assert _same(_weights(ref), _weights(job))


def test_spec_errors_name_the_field(tmp_path, tiny_spec_dict, capsys):
    bad = dict(tiny_spec_dict, optim={"lr": "fast"})
    spec_file = tmp_path / "bad.json"
    spec_file.write_text(json.dumps(bad))
    assert cli_main(["run", str(spec_file), "--job-dir", str(tmp_path / "j")]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "j").exists()


@pytest.mark.parametrize("given, field", [
    ({"optim": {"lr": float("nan")}}, "optim.lr"),
    ({"optim": {"lr": "nan"}}, "optim.lr"),
    ({"optim": {"eps": float("inf")}}, "optim.eps"),
    ({"steps": float("nan")}, "steps"),
    ({"batch_size": float("inf")}, "batch_size"),
    ({"guard": {"rise": float("nan")}}, "guard.rise"),
    ({"budget": float("nan")}, "budget"),
    ({"budget": float("inf")}, "budget"),
    ({"budget": "9" * 400 + "MiB"}, "budget"),
])
def test_non_finite_numbers_are_refused_naming_the_field(tiny_spec_dict, given, field):
    """NaN compares false against every bound, so it passed the range checks (issue 12, item 7)."""
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, **given})
    assert e.value.field == field and ("finite" in str(e.value) or "positive size" in str(e.value))


@pytest.mark.parametrize("output", ["seedlog.ezl", "spec.json", "report.json.tmp", "snapshots"])
def test_an_output_named_like_a_job_file_is_refused(tiny_spec_dict, output):
    """The trained weights would have overwritten the job's own seed-log or spec (issue 12, item 7)."""
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, "output": output})
    assert e.value.field == "output" and "job's own files" in str(e.value)
    with pytest.raises(SpecError):
        load_spec({**tiny_spec_dict, "name": output.removesuffix(".tmp") if output != "snapshots" else output})


def test_bad_data_says_why(tmp_path, tiny_spec_dict):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine", "label": "meh"}\n')
    job = make_job(tmp_path, tiny_spec_dict, task={**tiny_spec_dict["task"], "train": str(rows)})
    from edgezo.data import DataError

    with pytest.raises(DataError, match="label 'meh'"):
        run_job(job)


def test_a_job_whose_spec_json_was_edited_into_nonsense_fails_naming_the_field(tmp_path):
    """The worker trusts only a spec that passes the checks enqueue applied: a hand-edited spec.json
    fails with the field's name before any model is loaded, and so does an export of it."""
    from edgezo.export import read_spec
    from edgezo.spec import DEFAULT_SPEC, SpecError, load_spec

    spec = load_spec(DEFAULT_SPEC)
    spec["batch_size"] = "sixteen"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    for read in (run_job, read_spec):
        with pytest.raises(SpecError, match="batch_size"):
            read(tmp_path)
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        run_job(tmp_path)


@pytest.mark.parametrize("sets", [[], ["trainable=lora", "lora.alpha=16"], ["trainable=lora", "lora.alpha=8.5"],
                                  ["method=dizo", "optim.lr=1"], ["method=fo", "trainable=lora"]])
def test_a_validated_spec_validates_to_itself_byte_for_byte(sets):
    """The worker validates the spec.json the daemon wrote: if validating twice changed a value (an
    integer written for a float field turned into 16.0), the seed-log's spec hash would no longer
    match and the job could not resume."""
    from edgezo.spec import DEFAULT_SPEC, load_spec, spec_hash, validate

    once = load_spec(DEFAULT_SPEC, sets)
    twice = validate(json.loads(json.dumps(once)))
    assert json.dumps(twice, sort_keys=True) == json.dumps(once, sort_keys=True)
    assert spec_hash(twice) == spec_hash(once)


def test_the_worker_sizes_its_leases_with_the_daemons_estimator(tiny_spec_dict):
    """One estimator: the eval, projection and fo leases a worker asks for are what the daemon's
    estimate of the same spec, read from the model's config.json, says those phases add."""
    from edgezo.model_files import model_config
    from edgezo.spec import load_spec
    from edgezo.trainer import build_engine, eval_lease_bytes, fo_lease_bytes, projection_lease_bytes
    from policies import memory as mem

    for method, trainable in (("dizo", "full"), ("fo", "full"), ("fo", "lora")):
        spec = load_spec({**tiny_spec_dict, "method": method, "trainable": trainable,
                          **({"dizo": {"projection": "fo"}} if method == "dizo" else {})})
        engine = build_engine(spec)
        cfg = {**model_config(spec["model"]), "attn_implementation": engine.model.config._attn_implementation}
        fp = mem.estimate(cfg, batch_size=spec["batch_size"], max_length=spec["max_length"], method=method,
                          trainable=trainable, lora=spec["lora"])
        b, n = spec["batch_size"], spec["max_length"]
        assert eval_lease_bytes(engine, b, n) == fp.heavy["eval"]
        if method == "dizo":
            assert projection_lease_bytes(engine, b, n) == fp.heavy["projection"]
        if method == "fo":
            assert fo_lease_bytes(engine, b, n) == fp.heavy["fo_step"], trainable
