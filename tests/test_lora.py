"""LoRA adapters (peft) as the ZO trainable set, on fp32 and on an LLM.int8 base (bitsandbytes, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgezo.cli import main as cli_main
from edgezo.data import read_rows
from edgezo.spec import SpecError, load_spec
from edgezo.tasks import make_task
from edgezo.trainer import TrainingError, build_engine, prepare_job_dir, restore, run_job

LORA_OPTIM = {"lr": 1e-2, "eps": 1e-2}  # adapters start at B = 0: a larger step than full-parameter MeZO


def _spec(spec_dict: dict, **overrides) -> dict:
    # the guard's held-out watch off: these short runs must hand back trained adapters (the watch would
    # return a tiny run that did not beat its start on 12 sentences to the untrained ones; tests/test_guard.py)
    return load_spec({**spec_dict, "trainable": "lora", "optim": LORA_OPTIM, "guard": {"held_out": 0}, **overrides})


def _task(engine, spec):
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"],
                     engine.device)
    return task, task.encode(read_rows(Path(spec["task"]["train"]), "task.train"), "train")


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def _base_state(model) -> dict[str, torch.Tensor]:
    """Every base tensor (parameters, buffers, bitsandbytes' int8 scales), adapters excluded."""
    out = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    for name, mod in model.named_modules():
        scb = getattr(getattr(mod, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            out[f"{name}.state.SCB"] = scb.clone()
    return out


# --- spec validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    ({"precision": "int8", "trainable": "full"}, "trainable"),
    ({"precision": "int8", "trainable": ["q_proj"]}, "trainable"),
    ({"precision": "int8", "trainable": "lora", "model": "/models/x.gguf"}, "precision"),
    ({"trainable": "lora", "lora": {"dropout": 0.1}}, "lora.dropout"),
    ({"trainable": "lora", "lora": {"rank": 0}}, "lora.rank"),
    ({"trainable": "lora", "lora": {"rank": 2.5}}, "lora.rank"),
    ({"trainable": "lora", "lora": {"alpha": 0}}, "lora.alpha"),
    ({"trainable": "lora", "lora": {"targets": []}}, "lora.targets"),
    ({"trainable": "lora", "lora": {"bias": "all"}}, "lora.bias"),
])
def test_bad_combinations_raise_spec_error_naming_the_field(tiny_spec_dict, overrides, field):
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, **overrides})
    assert e.value.field == field and field in str(e.value)


def test_good_lora_specs_validate(tiny_spec_dict):
    spec = load_spec({**tiny_spec_dict, "precision": "int8", "trainable": "LoRA", "lora": {"targets": "q_proj,o_proj"}})
    assert spec["trainable"] == "lora" and spec["lora"]["targets"] == ["q_proj", "o_proj"]
    assert spec["lora"]["rank"] == 8 and spec["lora"]["alpha"] == 16.0
    assert load_spec({**tiny_spec_dict, "trainable": "lora", "method": "dizo"})["precision"] == "fp32"


def test_targets_matching_no_module_fail_naming_lora_targets(tiny_spec_dict):
    with pytest.raises(TrainingError, match="lora.targets"):
        build_engine(_spec(tiny_spec_dict, lora={"targets": ["no_such_proj"]}))


# --- the engine ------------------------------------------------------------------------------------

def test_adapter_init_is_a_function_of_the_job_seed(tiny_spec_dict):
    rng = torch.random.get_rng_state()
    a = build_engine(_spec(tiny_spec_dict))
    assert torch.equal(torch.random.get_rng_state(), rng), "adapter init must not consume the global RNG"
    b = build_engine(_spec(tiny_spec_dict))
    c = build_engine(_spec(tiny_spec_dict, seed=1))
    names = [p.name for p in a.params]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    for pa, pb, pc in zip(a.params, b.params, c.params):
        assert torch.equal(pa.param, pb.param)
        if ".lora_A." in pa.name:
            assert not torch.equal(pa.param, pc.param) and pa.param.abs().sum() > 0
        else:
            assert not pa.param.any(), "lora_B starts at zero: the adapted model starts equal to the base"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_lora_zo_changes_only_adapter_tensors(tiny_spec_dict, precision):
    spec = _spec(tiny_spec_dict, precision=precision)
    engine = build_engine(spec)
    if precision == "int8":
        import bitsandbytes as bnb

        int8 = [m for m in engine.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        assert int8 and all(m.weight.dtype == torch.int8 for m in int8)
    task, train = _task(engine, spec)
    task.objective(train[:4])  # bitsandbytes moves the int8 row scales into layer.state on the first forward
    base = _base_state(engine.model)
    adapters = {p.name: p.param.detach().clone() for p in engine.params}
    for step in range(4):
        engine.method.step(step, lambda s=step: task.objective(train[4 * s: 4 * s + 4]))
    after = _base_state(engine.model)
    assert base.keys() == after.keys()
    assert all(torch.equal(base[k], after[k]) for k in base), "a base tensor changed"
    assert all(not torch.equal(adapters[p.name], p.param) for p in engine.params), "an adapter did not move"
    assert all(p.param.dtype == torch.float32 for p in engine.params)


def _mean_loss(task, examples) -> float:
    return sum(task.objective(examples[i: i + 16]) for i in range(0, len(examples), 16)) / ((len(examples) + 15) // 16)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_lora_trains_on_cpu_and_the_adapter_reloads_with_peft(tmp_path, tiny_spec_dict, precision):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgezo.models import int8_kwargs

    spec = _spec(tiny_spec_dict, precision=precision, steps=24, eval_size=0)
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    out = job / spec["output"]
    assert (out / "adapter_config.json").is_file() and not list(out.glob("model*.safetensors"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]

    # the loss moved: the trained adapter (rebuilt bit-exactly from the seed-log) against the initial one
    fresh = build_engine(spec)
    task, train = _task(fresh, spec)
    before = _mean_loss(task, train)
    restore(fresh, job / "seedlog.ezl")
    trained = _adapter(out)
    for p in fresh.params:  # peft drops the adapter name ("default") from the saved keys
        assert torch.equal(p.param, trained[p.name.replace(".default", "")])
    after = _mean_loss(task, train)
    assert after < before - 1e-3, (before, after)

    kwargs = int8_kwargs(torch.device("cpu")) if precision == "int8" else {"dtype": torch.float32}
    base = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    ids = torch.tensor([fresh.tokenizer("Review: a lovely film , smart and funny .\nSentiment:")["input_ids"]])
    with torch.no_grad():
        want = fresh.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        plain = reloaded.get_base_model()
        with reloaded.disable_adapter():
            untouched = plain(input_ids=ids).logits
    assert torch.equal(got, want)
    assert not torch.equal(got, untouched), "the adapter should change the logits"


@pytest.mark.parametrize("precision, method", [("fp32", "mezo"), ("fp32", "dizo"), ("int8", "mezo")])
def test_lora_replay_is_bit_exact(tmp_path, tiny_spec_dict, precision, method):
    spec = _spec(tiny_spec_dict, precision=precision, method=method, steps=9, snapshot_every=4, eval_size=0,
                 dizo={"interval": 3, "iters": 2})
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    trained = _adapter(job / spec["output"])
    assert any(t.any() for k, t in trained.items() if "lora_B" in k)
    if method == "dizo":
        events = [json.loads(x) for x in (job / "events.jsonl").read_text().splitlines()]
        ratios = [r for e in events if e["kind"] == "projection" for r in e["ratios"]]
        assert len(ratios) == 3 * 8 and any(r != 1.0 for r in ratios)
    for flag, name in (([], "replayed"), (["--from-base"], "from-base")):
        assert cli_main(["replay", str(job), "--out", str(tmp_path / name), *flag]) == 0
        replayed = _adapter(tmp_path / name)
        assert trained.keys() == replayed.keys()
        assert all(torch.equal(trained[k], replayed[k]) for k in trained), f"replay {flag} differs"


def test_dizo_over_lora_projects_around_the_initial_adapter(tiny_spec_dict):
    spec = _spec(tiny_spec_dict, method="dizo", dizo={"interval": 2, "iters": 2})
    engine = build_engine(spec)
    method = engine.method
    assert method.theta0.mode() == "host-copy" and len(method.layers) == 8
    init = {p.name: p.param.detach().clone() for p in method.layers}
    for p in method.layers:
        assert torch.equal(method.theta0.get(p), init[p.name])
    task, train = _task(engine, spec)
    for step in range(2):
        engine.method.step(step, lambda s=step: task.objective(train[4 * s: 4 * s + 4]))
    before = {p.name: p.param.detach().clone() for p in method.layers}
    rec = method.project(1, lambda: task.objective(train[:4]), lambda: task.loss(train[:4]))
    for (index, gamma, norm), p in zip(rec.layers, method.layers):
        assert index == p.index and norm > 0  # lora_B moved away from 0, lora_A from its init
        want = init[p.name] + (gamma / norm) * (before[p.name] - init[p.name])
        torch.testing.assert_close(p.param, want, rtol=0, atol=1e-6)
