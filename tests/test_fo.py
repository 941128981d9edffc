"""method: fo, the first-order baseline (AdamW through a backward), on the tiny model of edgezo/testing/tiny.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgezo import seedlog
from edgezo.cli import main as cli_main
from edgezo.data import read_rows
from edgezo.hooks import TrainerHooks
from edgezo.spec import SpecError, load_spec
from edgezo.tasks import make_task
from edgezo.testing.tiny import job_weights, same_tensors
from edgezo.trainer import Paused, TrainingError, build_engine, prepare_job_dir, run_job

FO_OPTIM = {"lr": 1e-2, "weight_decay": 0.01}


def _spec(spec_dict: dict, **overrides) -> dict:
    return load_spec({**spec_dict, "method": "fo", "optim": FO_OPTIM, **overrides})


def _job(tmp_path, spec_dict, name="job", **overrides) -> Path:
    return prepare_job_dir(tmp_path / name, _spec(spec_dict, **overrides))


def _task(engine, spec):
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"],
                     engine.device)
    return task, task.encode(read_rows(Path(spec["task"]["train"]), "task.train"), "train")


def _steps(job: Path) -> list[dict]:
    _, frames = seedlog.read(job / "seedlog.ezl")
    return list(seedlog.body(frames, seedlog.STEP))


# --- spec ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"precision": "int8", "trainable": "scales"}, "trainable"),
    ({"precision": "int8", "trainable": "full"}, "trainable"),
    ({"precision": "fp16", "trainable": "full"}, "precision"),
    ({"precision": "fp16", "trainable": ["q_proj"]}, "precision"),
    ({"task": {"objective": "accuracy"}}, "task.objective"),
    ({"method": "sgd"}, "method"),
    ({"guard": {"rise": 0.25}}, "guard.rise"),  # the guard rolls back by replaying ZO steps
])
def test_spec_errors_name_the_field(tiny_spec_dict, overrides, field):
    given = {**tiny_spec_dict, "method": "fo", **overrides}
    if "task" in overrides:
        given["task"] = {**tiny_spec_dict["task"], **overrides["task"]}
    with pytest.raises(SpecError) as e:
        load_spec(given)
    assert e.value.field == field and f"'{field}'" in str(e.value)


def test_good_fo_specs_validate(tiny_spec_dict):
    assert _spec(tiny_spec_dict)["method"] == "fo"
    assert _spec(tiny_spec_dict, precision="int8", trainable="lora")["trainable"] == "lora"
    assert _spec(tiny_spec_dict, precision="bf16", trainable=["q_proj", "v_proj"])["precision"] == "bf16"
    assert _spec(tiny_spec_dict, trainable="top1")["guard"]["rise"] == 0.0  # off for fo, whatever the default


# --- the method ------------------------------------------------------------------------------------

def test_only_the_trainable_set_takes_gradients_and_checkpointing_engages(tiny_spec_dict):
    """Each decoder layer's attention runs twice per step (forward, then recomputed in the backward), and
    the gradients equal an uncheckpointed backward's: checkpointing is on although the model is in eval mode."""
    spec = _spec(tiny_spec_dict, trainable=["q_proj", "v_proj"])
    engine = build_engine(spec)
    grad = {n for n, p in engine.model.named_parameters() if p.requires_grad}
    assert grad == {p.name for p in engine.params} and all("q_proj" in n or "v_proj" in n for n in grad)
    task, train = _task(engine, spec)
    batch = train[:4]
    layers = engine.model.model.layers
    calls = []
    handles = [lay.self_attn.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, lay in enumerate(layers)]
    method = engine.method
    grads = {}
    method.opt.step = lambda: grads.update({n: p.param.grad.clone() for n, p in zip(grad, engine.params)})
    method.step(0, lambda: task.loss(batch))
    assert sorted(calls) == [0, 0, 1, 1], calls  # each layer: forward + recompute
    assert not engine.model.training and not any(m.training for m in engine.model.modules())
    calls.clear()
    ref = {}
    method.layers, keep = [], method.layers  # the same step without checkpointing
    method.opt.step = lambda: ref.update({n: p.param.grad.clone() for n, p in zip(grad, engine.params)})
    method.step(0, lambda: task.loss(batch))
    method.layers = keep
    assert sorted(calls) == [0, 1]
    for h in handles:
        h.remove()
    assert grads.keys() == ref.keys() and all(torch.allclose(grads[k], ref[k], atol=1e-6) for k in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_fo_lowers_the_training_loss(tiny_spec_dict, trainable):
    spec = _spec(tiny_spec_dict, trainable=trainable)
    engine = build_engine(spec)
    task, train = _task(engine, spec)
    batch = train[:16]
    with torch.no_grad():
        before = float(task.loss(batch))
    losses = [engine.method.step(s, lambda: task.loss(batch)).loss for s in range(15)]
    with torch.no_grad():
        after = float(task.loss(batch))
    assert losses[0] == pytest.approx(before)
    assert after < 0.7 * before, (before, after, losses)
    base = {n: p for n, p in engine.model.named_parameters() if "lora_" not in n}
    if trainable == "lora":  # the base stays frozen and bit-identical
        fresh = build_engine(spec)
        assert all(torch.equal(p, dict(fresh.model.named_parameters())[n]) for n, p in base.items())


# --- the trainer -----------------------------------------------------------------------------------

class _Leases(TrainerHooks):
    def __init__(self, pause_at: int | None = None):
        self.asked, self.released, self.pause_at, self.step = [], [], pause_at, -1

    def try_lease(self, phase, nbytes):
        self.asked.append((phase, nbytes))
        return True

    def release_lease(self, phase):
        self.released.append(phase)

    def on_event(self, kind, data):
        if kind == "step":
            self.step = data["step"]
            self.forwards = data["forwards"]

    def control(self):
        return "pause" if self.pause_at is not None and self.step + 1 == self.pause_at else "run"


def test_report_lease_and_log(tmp_path, tiny_spec_dict):
    job = _job(tmp_path, tiny_spec_dict, trainable="lora")
    hooks = _Leases()
    report = run_job(job, hooks)
    on_disk = json.loads((job / "report.json").read_text())
    assert on_disk["status"] == "done" and on_disk["steps_done"] == 6 and on_disk["method"] == "fo"
    assert on_disk["metrics"]["zero_shot"]["n"] == 16 and on_disk["metrics"]["final"]["n"] == 16
    assert len(on_disk["metrics"]["history"]) == 3  # zero-shot, periodic at 3, final
    assert on_disk["timing"]["steps_per_s"] > 0 and on_disk["timing"]["steps_this_run"] == 6
    mem = report["memory"]
    assert mem["peak_bytes"] >= mem["avg_bytes"] > 0
    assert {"fo_step", "eval", "export"} <= set(mem["phases"]) and "zo_step" not in mem["phases"]
    assert mem["phases"]["fo_step"]["peak_bytes"] > 0
    # one lease for the whole run, no separate eval leases, released at the end
    assert [p for p, _ in hooks.asked] == ["fo_step"] and hooks.released == ["fo_step"]
    assert hooks.asked[0][1] > 0
    steps = _steps(job)
    assert [r["step"] for r in steps] == list(range(6))
    assert all(r["method"] == "fo" and not r["replayable"] and "seeds" not in r for r in steps)
    assert all(r["loss"] > 0 and r["lr"] == FO_OPTIM["lr"] for r in steps)
    assert hooks.forwards == 4  # forward, its recomputation, a backward of about two
    assert (job / "tiny" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_resume_from_snapshot_is_bit_exact(tmp_path, tiny_spec_dict, trainable):
    """Paused after step 6 (snapshot at step 3, i.e. after 4 steps): resume reloads weights and AdamW
    moments from the snapshot, cuts steps 4..6 from the log, reruns them, and ends bit-identical."""
    kw = dict(trainable=trainable, steps=10, snapshot_every=4, eval_size=0, optim={**FO_OPTIM, "schedule": "linear"})
    ref = _job(tmp_path, tiny_spec_dict, name="ref", **kw)
    run_job(ref)
    job = _job(tmp_path, tiny_spec_dict, name="cut", **kw)
    hooks = _Leases(pause_at=7)
    with pytest.raises(Paused):
        run_job(job, hooks)
    assert hooks.released == ["fo_step"]  # a pause gives the lease back
    assert [r["step"] for r in _steps(job)] == list(range(7))
    assert sorted(p.name for p in (job / "snapshots").iterdir()) == ["optim-00000003.safetensors",
                                                                     "step-00000003.safetensors"]
    report = run_job(job)
    assert report["steps_done"] == 10 and report["timing"]["steps_this_run"] == 6
    assert [r["step"] for r in _steps(job)] == list(range(10))  # no step logged twice
    assert same_tensors(job_weights(ref), job_weights(job))
    other = _job(tmp_path, tiny_spec_dict, name="other", **{**kw, "optim": {**kw["optim"], "lr": 2e-2}})
    run_job(other)
    assert not same_tensors(job_weights(ref), job_weights(other))


def test_resume_without_optimizer_state_would_diverge(tmp_path, tiny_spec_dict):
    """The snapshot's AdamW moments matter: resuming onto fresh moments gives other weights."""
    kw = dict(trainable="lora", steps=8, snapshot_every=4, eval_size=0)
    ref = _job(tmp_path, tiny_spec_dict, name="ref", **kw)
    run_job(ref)
    job = _job(tmp_path, tiny_spec_dict, name="zeroed", **kw)
    with pytest.raises(Paused):
        run_job(job, _Leases(pause_at=5))
    from safetensors.torch import load_file, save_file

    optim = job / "snapshots" / "optim-00000003.safetensors"
    save_file({k: (v if k.endswith("::step") else torch.zeros_like(v)) for k, v in load_file(str(optim)).items()},
              str(optim))
    run_job(job)
    assert not same_tensors(job_weights(ref), job_weights(job))


def test_resume_with_no_snapshot_restarts_from_the_start(tmp_path, tiny_spec_dict):
    kw = dict(steps=5, snapshot_every=0, eval_size=0)
    ref = _job(tmp_path, tiny_spec_dict, name="ref", **kw)
    run_job(ref)
    job = _job(tmp_path, tiny_spec_dict, name="job", **kw)
    with pytest.raises(Paused):
        run_job(job, _Leases(pause_at=3))
    run_job(job)
    assert [r["step"] for r in _steps(job)] == list(range(5))
    assert same_tensors(job_weights(ref), job_weights(job))


def test_replay_refuses_with_a_clear_error(tmp_path, tiny_spec_dict, capsys):
    job = _job(tmp_path, tiny_spec_dict, steps=4, snapshot_every=2, eval_size=0)
    run_job(job)
    for flag in ([], ["--from-base"]):
        assert cli_main(["replay", str(job), "--out", str(tmp_path / "out"), *flag]) == 1
        err = capsys.readouterr().err
        assert "method: fo" in err and "not replayable" in err and "snapshots/" in err and "output" in err
    assert not (tmp_path / "out").exists()
    from edgezo.trainer import restore

    engine = build_engine(json.loads((job / "spec.json").read_text()))
    with pytest.raises(TrainingError, match="not replayable"):
        restore(engine, job / "seedlog.ezl", use_snapshots=False)
    with pytest.raises(NotImplementedError, match="not be redone"):
        from edgezo.zo import StepRecord

        engine.method.apply(StepRecord(step=0, seeds=[], grads=[], lr=0.1, weight_decay=0.0))


# --- the daemon (torch-free) -----------------------------------------------------------------------

def test_an_fo_jobs_steps_are_stated_as_fo_step():
    """The worker states its phase with every event; an fo job's steps are `fo_step`, a ZO job's
    `zo_step`, and after the last step either one is finishing (`export`)."""
    from edgezo.protocol import PhaseTracker, step_phase
    from policies.memory import SMOLLM2_135M, estimate

    assert step_phase("fo") == "fo_step" and step_phase("mezo") == "zo_step"
    tracker = PhaseTracker()
    tracker.see("start", {"steps_total": 10, "resumed_from": 0, "step_phase": step_phase("fo")})
    tracker.see("step", {"step": 3})
    tracker.see("phase", {"phase": "eval", "state": "begin"})
    assert tracker.current() == "eval"
    assert tracker.see("phase", {"phase": "eval", "state": "end"})[0] == "fo_step"
    assert tracker.see("step", {"step": 9})[0] == "export"
    full = estimate(SMOLLM2_135M, method="fo", trainable="full")
    lora = estimate(SMOLLM2_135M, method="fo", trainable="lora")
    assert full.heavy["fo_step"] > lora.heavy["fo_step"] > 0 and "fo_step" not in estimate(SMOLLM2_135M).heavy
