"""`trainable: scales` (QZO-style): ZO on an LLM.int8 base that moves only the per-row scales."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgezo.cli import main as cli_main
from edgezo.data import read_rows
from edgezo.spec import SpecError, load_spec
from edgezo.tasks import make_task
from edgezo.trainer import build_engine, prepare_job_dir, restore, run_job

SCALES_OPTIM = {"lr": 1e-3, "eps": 1e-3}


def _spec(spec_dict: dict, **overrides) -> dict:
    return load_spec({**spec_dict, "precision": "int8", "trainable": "scales", "optim": SCALES_OPTIM, **overrides})


def _task(engine, spec):
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"],
                     engine.device)
    return task, task.encode(read_rows(Path(spec["task"]["train"]), "task.train"), "train")


def _layers(model):
    import bitsandbytes as bnb

    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]


def _mean_loss(task, examples) -> float:
    return sum(task.objective(examples[i: i + 16]) for i in range(0, len(examples), 16)) / ((len(examples) + 15) // 16)


@pytest.mark.parametrize("overrides, field", [
    ({"precision": "fp16", "trainable": "scales"}, "trainable"),
    ({"precision": "int8", "trainable": "scales", "method": "dizo", "dizo": {"projection": "fo"}}, "dizo.projection"),
])
def test_scales_need_an_int8_base_and_zo_projection(tiny_spec_dict, overrides, field):
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, **overrides})
    assert e.value.field == field
    assert load_spec({**tiny_spec_dict, "precision": "int8", "trainable": "Scales"})["trainable"] == "scales"


def test_scales_zo_moves_only_the_scales_never_the_codes(tiny_spec_dict):
    spec = _spec(tiny_spec_dict)
    engine = build_engine(spec)
    layers = _layers(engine.model)
    assert layers and len(engine.params) == len(layers)  # one scale vector per int8 layer, nothing else
    assert all(p.name.endswith(".weight_scale") and p.param.dtype == torch.float32 for p in engine.params)
    codes = {n: m.state.CB.clone() for n, m in layers}
    others = {n: t.detach().clone() for n, t in engine.model.state_dict().items()
              if not n.endswith((".SCB", ".weight_scale", ".weight_format")) and t.dtype != torch.int8}
    scales = {p.name: p.param.detach().clone() for p in engine.params}
    task, train = _task(engine, spec)
    recs = [engine.method.step(s, lambda s=s: task.objective(train[4 * s: 4 * s + 4])) for s in range(3)]
    assert all(torch.equal(codes[n], m.state.CB) for n, m in layers), "an int8 code changed"
    state = engine.model.state_dict()
    assert all(torch.equal(others[n], state[n]) for n in others), "a non-scale tensor changed"
    for _n, m in layers:  # what bitsandbytes multiplies by is the trained parameter itself
        assert m.state.SCB.data_ptr() == m.weight_scale.data_ptr()
    assert all(not torch.equal(scales[p.name], p.param) for p in engine.params)
    assert any(r.grads[0] != 0 for r in recs)


def test_scales_perturbation_reaches_the_int8_matmul(tiny_spec_dict):
    """A perturbed forward must see perturbed scales (else every projected gradient is 0)."""
    spec = _spec(tiny_spec_dict)
    engine = build_engine(spec)
    task, train = _task(engine, spec)
    base = task.objective(train[:4])
    with engine.perturber.active(seed=7, alpha=1e-2):
        plus = task.objective(train[:4])
    assert plus != base
    assert task.objective(train[:4]) == base, "the scales must be back after a perturbed forward"


def test_scales_train_replay_bit_exact_and_export_reloads(tmp_path, tiny_spec_dict):
    from transformers import AutoModelForCausalLM

    spec = _spec(tiny_spec_dict, steps=24, eval_size=0, snapshot_every=10)
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    out = job / spec["output"]

    fresh = build_engine(spec)
    task, train = _task(fresh, spec)
    before = _mean_loss(task, train)
    restore(fresh, job / "seedlog.ezl", use_snapshots=False)  # every step replayed from the base
    after = _mean_loss(task, train)
    assert after < before - 1e-4, (before, after)

    saved = load_file(str(next(out.glob("*.safetensors"))))
    assert not any(k.endswith(".weight_scale") for k in saved), "the export is a plain bitsandbytes checkpoint"
    for p in fresh.params:
        assert torch.equal(saved[p.name.replace(".weight_scale", ".SCB")], p.param)

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": "cpu"}).eval()
    ids = torch.tensor([fresh.tokenizer("Review: a lovely film , smart and funny .\nSentiment:")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, fresh.model(input_ids=ids).logits)

    assert cli_main(["replay", str(job), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(str(next((tmp_path / "replayed").glob("*.safetensors"))))
    assert all(torch.equal(saved[k], replayed[k]) for k in saved), "replay differs from the trained model"


def test_dizo_projects_the_scales_around_their_quantised_start(tiny_spec_dict):
    spec = _spec(tiny_spec_dict, method="dizo", dizo={"interval": 2, "iters": 2})
    engine = build_engine(spec)
    method = engine.method
    assert method.theta0.mode() == "host-copy" and len(method.layers) == 4  # q_proj, v_proj x 2 layers
    task, train = _task(engine, spec)
    for s in range(2):
        engine.method.step(s, lambda s=s: task.objective(train[4 * s: 4 * s + 4]))
    rec = method.project(1, lambda: task.objective(train[:4]), lambda: task.loss(train[:4]))
    assert all(norm > 0 for _, _, norm in rec.layers)


def test_dizo_over_scales_replays_bit_exact(tmp_path, tiny_spec_dict):
    spec = _spec(tiny_spec_dict, method="dizo", steps=6, eval_size=0, dizo={"interval": 3, "iters": 2})
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    saved = load_file(str(next((job / spec["output"]).glob("*.safetensors"))))
    assert cli_main(["replay", str(job), "--out", str(tmp_path / "replayed"), "--from-base"]) == 0
    replayed = load_file(str(next((tmp_path / "replayed").glob("*.safetensors"))))
    assert saved.keys() == replayed.keys() and all(torch.equal(saved[k], replayed[k]) for k in saved)
