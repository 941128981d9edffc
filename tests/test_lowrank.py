"""Low-rank directions (`optim.directions: lowrank`): z = U·Vᵀ/√r per Linear weight, applied inside
the forward; exactness, equivalence to materialised weights, replay/resume, spec, learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from edgezo import seedlog, trainer
from edgezo.cli import main as cli_main
from edgezo.data import read_rows
from edgezo.hooks import TrainerHooks
from edgezo.lowrank import LowRankDirections, add_lowrank_into, factors, lowrank_eligible
from edgezo.models import load
from edgezo.noise import TorchNoise, add_noise_into, mix
from edgezo.perturb import Perturber, collect_params
from edgezo.spec import SpecError, load_spec, spec_hash
from edgezo.tasks import make_task
from edgezo.testing.tiny import (
    PauseAt,
    job_events,
    job_weights,
    replayed,
    rewrite_log,
    same_tensors,
    tiny_spec,
)
from edgezo.trainer import (
    EventLog,
    Paused,
    TrainingError,
    build_engine,
    prepare_job_dir,
    run_job,
    shared_prefix,
)
from edgezo.zo import FZOO, MeZO, StepRecord, step_seed


def _setup(model_dir, tmp_path, precision="fp32", trainable="full", rank=1):
    spec = load_spec(tiny_spec(model_dir, tmp_path / "data", precision=precision, trainable=trainable))
    model, tok, _ = load(spec["model"], precision, torch.device("cpu"))
    params = collect_params(model, None if trainable == "full" else trainable)
    pert = Perturber(params, directions="lowrank", rank=rank)
    task = make_task(spec["task"], model, tok, pert, 32, torch.device("cpu"))
    examples = task.encode(read_rows(spec["task"]["train"], "task.train"), "train")
    return spec, model, params, pert, task, examples


def _state(params):
    return {p.name: p.param.detach().clone() for p in params}


def test_which_parameters_get_lowrank_directions(tiny_model_dir, tmp_path):
    _, model, params, pert, *_ = _setup(tiny_model_dir, tmp_path)
    assert isinstance(pert.noise, LowRankDirections) and pert.noise.name == "torch"
    low = {p.name for p in params if pert.noise.is_lowrank(p)}
    # every attention/MLP projection and the tied embedding/head table; not the norms
    linears = {n + ".weight" for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n}
    assert low == linears | {"model.embed_tokens.weight"}
    assert not any("norm" in n for n in low)
    assert all(p.param.dim() == 2 for p in params if pert.noise.is_lowrank(p))
    # a log written before tables went low-rank: the table keeps the dense stream
    pert.use_lowrank_tables(False)
    assert {p.name for p in params if pert.noise.is_lowrank(p)} == linears
    pert.use_lowrank_tables(True)
    # U,V are a pure function of (seed, index), from a stream apart from the dense one's
    p = next(p for p in params if pert.noise.is_lowrank(p))
    u1, v1 = factors(p, 5, 2)
    u2, v2 = factors(p, 5, 2)
    assert torch.equal(u1, u2) and torch.equal(v1, v2)
    dense_first = torch.empty(4).normal_(generator=torch.Generator().manual_seed(mix(5, p.index)))
    assert not torch.equal(u1[0, :4], dense_first)
    # re-assigning the stream (what resume does) keeps the kind
    pert.noise = TorchNoise()
    assert isinstance(pert.noise, LowRankDirections)
    # a plain Embedding's table is; one with max_norm (its lookup writes the table) or a subclass
    # with its own forward (OPT's learned positions) is not, nor a 1-D tensor
    assert lowrank_eligible(collect_params(nn.Embedding(10, 4), None)[0])
    assert not lowrank_eligible(collect_params(nn.Embedding(10, 4), None)[0], tables=False)
    assert not lowrank_eligible(collect_params(nn.Embedding(10, 4, max_norm=1.0), None)[0])

    class Positions(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids + 2)

    assert not lowrank_eligible(collect_params(Positions(10, 4), None)[0])
    assert not lowrank_eligible(collect_params(nn.LayerNorm(4), None)[0])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rank", [1, 2])
def test_weights_change_only_by_the_update(tiny_model_dir, tmp_path, precision, rank):
    """After each step θ equals θ_prev + the logged update, bit for bit; a perturbed forward (and a
    zero-lr step) leaves the weights bit-identical."""
    _, _, params, pert, task, ex = _setup(tiny_model_dir, tmp_path, precision, rank=rank)
    method = MeZO(params, pert, lr=1e-2, eps=1e-3, seed=7)
    for step in range(3):
        before = _state(params)
        rec = method.step(step, lambda s=step: task.objective(ex[s * 4 : (s + 1) * 4]))
        alpha = -rec.lr * rec.grads[0]
        assert alpha != 0.0
        for p in params:
            if pert.noise.is_lowrank(p):
                expect = add_lowrank_into(torch.empty_like(p.param), p, rec.seeds[0], alpha, rank, src=before[p.name])
            else:
                expect = add_noise_into(torch.empty_like(p.param), p, rec.seeds[0], alpha, src=before[p.name])
            assert torch.equal(p.param, expect), f"{p.name} drifted at step {step} ({precision})"
            assert not torch.equal(p.param, before[p.name]) or p.param.dtype != torch.float32, p.name
        snap = _state(params)
        with pert.active(99 + step, 1e-2):
            task.objective(ex[:4])
        MeZO(params, pert, lr=0.0, eps=1e-3, seed=7).step(100 + step, lambda: task.objective(ex[:4]))
        assert all(torch.equal(snap[p.name], p.param) for p in params)


def test_update_is_u_v_transpose_over_root_r(tiny_model_dir, tmp_path):
    """The update equals θ + α·U·Vᵀ/√r (to fp32 rounding) and has rank r."""
    _, _, params, pert, *_ = _setup(tiny_model_dir, tmp_path, rank=2)
    p = next(p for p in params if pert.noise.is_lowrank(p))
    before = p.param.detach().clone()
    pert.noise.update([p], 11, 0.5)
    u, v = factors(p, 11, 2)
    expect = before + 0.5 * (u.T @ v) / math.sqrt(2)
    assert torch.allclose(p.param, expect, atol=1e-6, rtol=1e-5)
    assert int(torch.linalg.matrix_rank((p.param - before).double(), atol=1e-5)) == 2


@pytest.mark.parametrize("rank", [1, 3])
def test_perturbed_forward_equals_materialised_weights(tiny_model_dir, tmp_path, rank):
    """The forward with α·(x·V)·Uᵀ/√r added per Linear computes what a model holding W + α·U·Vᵀ/√r
    (and θ + αz for the dense rest) computes, to fp32 tolerance."""
    spec, model, params, pert, task, ex = _setup(tiny_model_dir, tmp_path, rank=rank)
    with pert.active(1234, 1e-2):
        hooked = task.objective(ex[:8])
    explicit = _materialised_objective(spec, model, pert, task, ex[:8], 1234, 1e-2)
    assert hooked == pytest.approx(explicit, rel=1e-5, abs=1e-6)
    assert abs(hooked - task.objective(ex[:8])) > 1e-5


def _materialised_objective(spec, model, pert, task, batch, seed: int, alpha: float) -> float:
    """The objective of a copy of the model holding W + α·U·Vᵀ/√r for the low-rank weights and θ + αz
    for the dense rest, run with no perturber: what the hooks must compute, to fp32 tolerance."""
    clone = copy.deepcopy(model)
    cparams = collect_params(clone, None)
    by_name = {p.name: p for p in pert.params}
    rank = pert.noise.rank
    with torch.no_grad():
        for cp in cparams:
            p = by_name.get(cp.name)
            if p is None:
                continue
            if pert.noise.is_lowrank(p):
                u, v = factors(p, seed, rank)
                cp.param.add_(alpha * (u.T @ v) / math.sqrt(rank))  # explicit W + α·U·Vᵀ/√r
            else:
                add_noise_into(cp.param.data, p, seed, alpha, src=cp.param.detach())  # in place
    ctask = make_task(spec["task"], clone, task.tok, Perturber(cparams), 32, torch.device("cpu"))
    return ctask.objective(batch)


def test_rows_and_full_equal_the_materialised_lowrank_weight():
    """An untied head read through Perturber.rows/full sees the same low-rank weight, bit for bit."""
    lin = nn.Linear(16, 40, bias=False)
    (p,) = collect_params(lin, None)
    pert = Perturber([p], directions="lowrank", rank=2)
    full = add_lowrank_into(torch.empty_like(p.param), p, 3, 0.1, 2)
    ids = torch.tensor([[0, 39, 7], [7, 7, 12]])
    with pert.active(3, 0.1):
        assert torch.equal(pert.rows(lin.weight, ids), full[ids])
        assert torch.equal(pert.full(lin.weight), full)
        x = torch.randn(5, 16)
        assert torch.allclose(lin(x), x @ full.T, atol=1e-5)
    assert lin.weight is p.param  # never swapped


def test_apply_replays_steps_exactly(tiny_model_dir, tmp_path):
    _, _, params, pert, task, ex = _setup(tiny_model_dir, tmp_path, rank=2)
    base = _state(params)
    method = MeZO(params, pert, lr=1e-2, eps=1e-3, weight_decay=0.1, perturbations=2, seed=3)
    recs = [method.step(s, lambda: task.objective(ex[:4])) for s in range(3)]
    trained = _state(params)
    with torch.no_grad():
        for p in params:
            p.param.copy_(base[p.name])
    for r in recs:
        method.apply(StepRecord(step=r.step, seeds=r.seeds, grads=r.grads, lr=r.lr, weight_decay=r.weight_decay))
    assert all(torch.equal(trained[p.name], p.param) for p in params)


def test_lowrank_lowers_the_training_loss(tiny_model_dir, tmp_path):
    """Deterministic (fixed model, data and seed): 0.747 -> 0.619 here. A rank-1 direction has spectral
    norm ~√(out·in) against ~√out+√in for a dense one, so it wants a smaller lr than dense (5e-3
    diverges on this model; 1e-3 descends steadily)."""
    _, _, params, pert, task, ex = _setup(tiny_model_dir, tmp_path)
    batch = ex[:16]
    start = task.objective(batch)
    method = MeZO(params, pert, lr=1e-3, eps=1e-3, seed=0)
    for step in range(30):
        method.step(step, lambda: task.objective(batch))
    assert task.objective(batch) < start - 0.05


def test_lora_adapters_take_lowrank_directions(tiny_model_dir, tmp_path):
    """peft's lora_A/lora_B are plain Linear weights: they get low-rank directions, exactly."""
    from edgezo.lora import wrap

    spec = load_spec(tiny_spec(tiny_model_dir, tmp_path / "data", trainable="lora"))
    model, tok, _ = load(spec["model"], "fp32", torch.device("cpu"))
    model = wrap(model, spec["lora"], 0)
    params = collect_params(model, ["lora_A.", "lora_B."])
    pert = Perturber(params, directions="lowrank", rank=1)
    assert params and all(pert.noise.is_lowrank(p) for p in params)
    task = make_task(spec["task"], model, tok, pert, 32, torch.device("cpu"))
    ex = task.encode(read_rows(spec["task"]["train"], "task.train"), "train")
    before = _state(params)
    rec = MeZO(params, pert, lr=1e-2, eps=1e-3, seed=1).step(0, lambda: task.objective(ex[:4]))
    for p in params:
        expect = add_lowrank_into(torch.empty_like(p.param), p, rec.seeds[0], -rec.lr * rec.grads[0], 1,
                                  src=before[p.name])
        assert torch.equal(p.param, expect), p.name


# --- the spec, the seed-log header, replay and resume -------------------------------------------


def test_spec_fields_are_validated_and_named(tiny_spec_dict):
    spec = load_spec(tiny_spec_dict)
    assert spec["optim"]["directions"] == "dense" and spec["optim"]["rank"] == 1
    for bad, field in (({"directions": "sparse"}, "optim.directions"), ({"directions": 3}, "optim.directions"),
                       ({"rank": 0}, "optim.rank"), ({"rank": 1.5}, "optim.rank"), ({"rank": "two"}, "optim.rank"),
                       ({"refresh": 4}, "optim.refresh")):
        with pytest.raises(SpecError) as e:
            load_spec({**tiny_spec_dict, "optim": {**tiny_spec_dict["optim"], **bad}})
        assert e.value.field == field, bad
        assert field in str(e.value)
    low = load_spec({**tiny_spec_dict, "optim": {**tiny_spec_dict["optim"], "directions": "LowRank", "rank": 2}})
    assert low["optim"]["directions"] == "lowrank" and low["optim"]["rank"] == 2
    # a dense spec hashes as before the fields existed (older logs resume); rank matters only for lowrank
    old = copy.deepcopy(spec)
    del old["optim"]["directions"], old["optim"]["rank"]
    assert spec_hash(spec) == spec_hash(old)
    assert spec_hash({**spec, "optim": {**spec["optim"], "rank": 4}}) == spec_hash(spec)
    assert spec_hash(low) != spec_hash(spec)
    assert spec_hash(low) != spec_hash({**low, "optim": {**low["optim"], "rank": 3}})


def _lowrank_spec(tiny_spec_dict, **kw):
    return load_spec({**tiny_spec_dict, "optim": {**tiny_spec_dict["optim"], "directions": "lowrank", "rank": 2},
                      "eval_size": 0, **kw})


@pytest.mark.parametrize("precision,method", [("fp32", "mezo"), ("bf16", "mezo"), ("fp32", "dizo")])
def test_replay_and_resume_are_bit_exact(tmp_path, tiny_spec_dict, precision, method):
    """MeZO in fp32 and bf16, and DiZO (its projections overriding low-rank weights, its steps taking
    low-rank directions through the same perturber)."""
    from safetensors.torch import load_file

    spec = _lowrank_spec(tiny_spec_dict, steps=8, snapshot_every=3, precision=precision, method=method,
                         dizo={"interval": 3, "iters": 2})
    ref = prepare_job_dir(tmp_path / "ref", spec)
    run_job(ref)
    header = seedlog.read(ref / "seedlog.ezl")[0]
    assert header["directions"] == "lowrank" and header["rank"] == 2
    trained = job_weights(ref)
    dense = prepare_job_dir(tmp_path / "dense", {**spec, "optim": {**spec["optim"], "directions": "dense"}})
    run_job(dense)
    assert not same_tensors(trained, job_weights(dense))

    for flag, out in (([], "replayed"), (["--from-base"], "from-base")):
        assert cli_main(["replay", str(ref), "--out", str(tmp_path / out), *flag]) == 0
        got = {}
        for f in (tmp_path / out).glob("*.safetensors"):
            got.update(load_file(str(f)))
        assert same_tensors(trained, got), f"replay {flag} differs"

    # interrupted after step 4 (the last steps' frames lost), then resumed: equals the uninterrupted run
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    header, frames = seedlog.read(job / "seedlog.ezl")
    kept = [f for f in frames if not (isinstance(f.data, dict) and f.data.get("step", -1) >= 5)]  # steps,
    # snapshots and DiZO projections from step 5 on
    assert any(f.kind == seedlog.STEP and f.data["step"] == 4 for f in kept) and len(kept) < len(frames)
    rewrite_log(job / "seedlog.ezl", header, kept)
    (job / "report.json").unlink()
    run_job(job)
    assert same_tensors(trained, job_weights(job))





def test_a_log_from_before_lowrank_tables_replays_and_resumes_as_written(tmp_path, tiny_spec_dict, monkeypatch):
    """A lowrank seed-log without `lowrank_tables` in its header was written with the embedding
    table on the dense stream: replay and resume rebuild its weights, not today's directions'."""
    import functools

    spec = _lowrank_spec(tiny_spec_dict, steps=6, snapshot_every=0, guard={"held_out": 0})  # keep what it trained
    new = prepare_job_dir(tmp_path / "new", spec)
    run_job(new)
    assert seedlog.read(new / "seedlog.ezl")[0]["lowrank_tables"] is True

    with monkeypatch.context() as m:  # the older code: tables dense, header without the key
        m.setattr(trainer, "Perturber", functools.partial(trainer.Perturber, lowrank_tables=False))
        old = prepare_job_dir(tmp_path / "old", spec)
        run_job(old)
    header, frames = seedlog.read(old / "seedlog.ezl")
    assert header.pop("lowrank_tables") is False
    rewrite_log(old / "seedlog.ezl", header, frames)
    written = job_weights(old)
    table = "model.embed_tokens.weight"
    assert not torch.equal(written[table], job_weights(new)[table])  # the table's directions differ

    assert same_tensors(written, replayed(tmp_path, old))
    kept = [f for f in frames if not (isinstance(f.data, dict) and f.data.get("step", -1) >= 3)]
    rewrite_log(old / "seedlog.ezl", header, kept)
    (old / "report.json").unlink()
    run_job(old)  # resumed at step 3 by today's code
    assert same_tensors(written, job_weights(old))


def test_resume_refuses_a_log_with_other_directions(tmp_path, tiny_spec_dict):
    spec = _lowrank_spec(tiny_spec_dict, steps=2)
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    header, frames = seedlog.read(job / "seedlog.ezl")
    rewrite_log(job / "seedlog.ezl", {**header, "directions": "dense", "rank": None}, frames)
    (job / "report.json").unlink()
    with pytest.raises(TrainingError, match="written with dense directions, but the spec asks for lowrank "
                                            r"directions of rank 2 \(optim.directions/optim.rank"):
        run_job(job)


# --- with what main gained: fzoo, topK's shared prefix, the divergence guard, method: fo ----------






def test_fzoo_perturbs_and_updates_along_lowrank_directions(tiny_model_dir, tmp_path):
    """fzoo's N one-sided forwards go through the low-rank hooks (each loss is the materialised
    W + ε·U·Vᵀ/√r model's), and its update (MeZO.apply, as replay runs it) is the low-rank one, exactly."""
    spec, model, params, pert, task, ex = _setup(tiny_model_dir, tmp_path, rank=2)
    batch, eps = ex[:8], 1e-2
    method = FZOO(params, pert, lr=1e-2, eps=eps, perturbations=3, seed=5)
    seeds = [step_seed(5, 0, k) for k in range(3)]
    explicit = [_materialised_objective(spec, model, pert, task, batch, s, eps) for s in seeds]
    before = _state(params)
    rec = method.step(0, task.step_objective(batch))
    assert rec.seeds == seeds
    spread = rec.extra["spread"]
    for g, want in zip(rec.grads, explicit):
        assert rec.loss + g * spread == pytest.approx(want, rel=1e-5, abs=1e-6)
    for p in params:
        expect = before[p.name].clone()
        for s, g in zip(rec.seeds, rec.grads):
            alpha = -rec.lr * g / len(rec.seeds)
            if pert.noise.is_lowrank(p):
                add_lowrank_into(expect, p, s, alpha, 2, src=expect)
            else:
                add_noise_into(expect, p, s, alpha, src=expect)
        assert torch.equal(p.param, expect), p.name


FZOO_LOWRANK = dict(method="fzoo", steps=8, snapshot_every=3, eval_size=0,
                    optim={"lr": 0.01, "eps": 1e-3, "perturbations": 4, "directions": "lowrank", "rank": 2})


@pytest.mark.parametrize("trainable", ["full", "top1"])
def test_fzoo_replay_and_resume_are_bit_exact(tmp_path, tiny_spec_dict, trainable):
    """fzoo over low-rank directions: the trained weights replay from the base, and a paused job
    resumes to the uninterrupted run's weights; on top1 the shared prefix passes its self-check."""
    kw = {**FZOO_LOWRANK, "trainable": trainable}
    ref = prepare_job_dir(tmp_path / "ref", load_spec({**tiny_spec_dict, **kw}))
    run_job(ref)
    header = seedlog.read(ref / "seedlog.ezl")[0]
    assert header["method"] == "fzoo" and header["directions"] == "lowrank" and header["rank"] == 2
    assert bool(job_events(ref, "prefix")) == (trainable == "top1")
    trained = job_weights(ref)
    assert same_tensors(trained, replayed(tmp_path, ref))

    dense = prepare_job_dir(tmp_path / "dense", load_spec({**tiny_spec_dict, **kw,
                                                           "optim": {**kw["optim"], "directions": "dense"}}))
    run_job(dense)
    assert not same_tensors(trained, job_weights(dense))

    job = prepare_job_dir(tmp_path / "paused", load_spec({**tiny_spec_dict, **kw}))
    with pytest.raises(Paused):
        run_job(job, PauseAt(5))
    run_job(job)
    assert same_tensors(trained, job_weights(job))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_shared_prefix_gives_the_full_lowrank_losses_bit_for_bit(tiny_spec_dict, tmp_path, precision):
    """topK + lowrank: only the top block's Linear layers carry low-rank hooks, so the frozen bottom's
    kept output feeds the same perturbed top as a full forward does, bit for bit."""
    spec = load_spec({**tiny_spec_dict, "trainable": "top1", "precision": precision,
                      "optim": {**tiny_spec_dict["optim"], "directions": "lowrank", "rank": 2}})
    engine = build_engine(spec)
    assert isinstance(engine.perturber.noise, LowRankDirections)
    low = [p.name for p in engine.params if engine.perturber.noise.is_lowrank(p)]
    assert low and all(n.startswith("model.layers.1.") for n in low)
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"],
                     engine.device)
    batch = task.encode(read_rows(spec["task"]["train"], "t")[:4], "t")
    prefix = shared_prefix(engine, task, batch, EventLog(tmp_path / "events.jsonl", TrainerHooks()))
    assert prefix is not None and prefix.cut == 1
    with torch.no_grad():
        full = [task.objective(batch)]
        for seed in (3, 4):
            with engine.perturber.active(seed, 1e-2):
                full.append(task.objective(batch))
        task.prefix = prefix
        objective = task.step_objective(batch)
        shared = [objective.base()]
        for seed in (3, 4):
            with engine.perturber.active(seed, 1e-2):
                shared.append(objective())
    assert shared == full and objective.forwards == 1
    assert full[1] != full[0]  # the low-rank term reached the top block


def test_top1_lowrank_with_the_prefix_cache_equals_a_run_without_it(tmp_path, tiny_spec_dict, monkeypatch):
    spec = load_spec({**tiny_spec_dict, **FZOO_LOWRANK, "trainable": "top1"})
    cached = prepare_job_dir(tmp_path / "cached", spec)
    run_job(cached)
    assert job_events(cached, "prefix")[0]["frozen_blocks"] == 1
    monkeypatch.setattr(trainer, "shared_prefix", lambda *a, **k: None)
    plain = prepare_job_dir(tmp_path / "plain", spec)
    run_job(plain)
    assert not job_events(plain, "prefix")
    assert same_tensors(job_weights(cached), job_weights(plain))
    losses = lambda j: [e["loss"] for e in job_events(j, "step")]  # noqa: E731
    assert losses(cached) == losses(plain)


def test_guard_rollback_and_resume_are_bit_exact_with_lowrank(tmp_path, tiny_spec_dict):
    """A forced divergence trips the guard; roll_back rebuilds the weights from the base through the
    low-rank update, so replay and a resume across the rollback give the uninterrupted run's weights."""
    kw = dict(method="fzoo", trainable="full", steps=24, eval_size=0, snapshot_every=0,
              optim={"lr": 3.0, "eps": 1e-3, "perturbations": 4, "directions": "lowrank", "rank": 1},
              guard={"rise": 0.1, "span": 4, "lr_factor": 0.25})
    ref = prepare_job_dir(tmp_path / "ref", load_spec({**tiny_spec_dict, **kw}))
    run_job(ref)
    rollbacks = job_events(ref, "rollback")
    assert rollbacks, "lr 3.0 along rank-1 directions should have diverged and tripped the guard"
    trained = job_weights(ref)
    assert same_tensors(trained, replayed(tmp_path, ref))

    job = prepare_job_dir(tmp_path / "paused", load_spec({**tiny_spec_dict, **kw}))
    with pytest.raises(Paused):
        run_job(job, PauseAt(rollbacks[0]["step"] + 2))
    run_job(job)
    assert same_tensors(trained, job_weights(job))
    assert [e["step"] for e in job_events(job, "rollback")] == [e["step"] for e in rollbacks]


def test_fo_refuses_lowrank_directions_naming_the_field(tiny_spec_dict):
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, "method": "fo", "optim": {"lr": 1e-3, "directions": "lowrank"}})
    assert e.value.field == "optim.directions" and "'optim.directions'" in str(e.value)
    # dense directions (rank is meaningless to them) are fine, and hash as if never given
    fo = load_spec({**tiny_spec_dict, "method": "fo", "optim": {"lr": 1e-3, "rank": 4}})
    assert fo["optim"]["directions"] == "dense"
    assert spec_hash(fo) == spec_hash(load_spec({**tiny_spec_dict, "method": "fo", "optim": {"lr": 1e-3}}))
