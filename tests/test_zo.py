"""Exact perturbation and MeZO on a tiny in-process model."""

from __future__ import annotations

import copy

import pytest
import torch

from edgezo.models import load
from edgezo.noise import add_noise_into, noise_chunks
from edgezo.perturb import Perturber, collect_params
from edgezo.spec import load_spec
from edgezo.tasks import make_task
from edgezo.testing.tiny import tiny_spec
from edgezo.zo import MeZO, StepRecord


def _setup(model_dir, tmp_path, precision="fp32", trainable="full"):
    spec = load_spec(tiny_spec(model_dir, tmp_path / "data", precision=precision, trainable=trainable))
    model, tok, _ = load(spec["model"], precision, torch.device("cpu"))
    params = collect_params(model, None if trainable == "full" else trainable)
    pert = Perturber(params)
    task = make_task(spec["task"], model, tok, pert, 32, torch.device("cpu"))
    from edgezo.data import read_rows

    examples = task.encode(read_rows(spec["task"]["train"], "task.train"), "train")
    return spec, model, params, pert, task, examples


def _state(params):
    return {p.name: p.param.detach().clone() for p in params}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_weights_change_only_by_the_update(tiny_model_dir, tmp_path, precision):
    """Exactness contract: after each step θ equals θ_prev + update, bit for bit (no perturbation drift)."""
    _, _, params, pert, task, ex = _setup(tiny_model_dir, tmp_path, precision)
    method = MeZO(params, pert, lr=1e-2, eps=1e-3, seed=7)
    for step in range(4):
        before = _state(params)
        rec = method.step(step, lambda s=step: task.objective(ex[s * 4 : (s + 1) * 4]))
        # Expected: the previous weights plus exactly the logged update, computed independently.
        for p in params:
            expect = add_noise_into(torch.empty_like(p.param), p, rec.seeds[0], -rec.lr * rec.grads[0],
                                    src=before[p.name])
            assert torch.equal(p.param, expect), f"{p.name} drifted at step {step} ({precision})"
        # A step whose update is zero leaves the weights bit-identical (perturb/restore is exact).
        zero = MeZO(params, pert, lr=0.0, eps=1e-3, seed=7)
        snap = _state(params)
        zero.step(100 + step, lambda: task.objective(ex[:4]))
        assert all(torch.equal(snap[p.name], p.param) for p in params)


def test_perturbed_forward_equals_materialised_weights(tiny_model_dir, tmp_path):
    """On-the-fly perturbation computes the same loss as a model whose weights hold θ + εz."""
    spec, model, params, pert, task, ex = _setup(tiny_model_dir, tmp_path)
    with pert.active(1234, 1e-2):
        hooked = task.objective(ex[:8])
    clone = copy.deepcopy(model)
    cparams = collect_params(clone, None)
    for p in cparams:
        add_noise_into(p.param.data, p, 1234, 1e-2)
    ctask = make_task(spec["task"], clone, task.tok, Perturber(cparams), 32, torch.device("cpu"))
    assert hooked == ctask.objective(ex[:8])
    assert hooked != task.objective(ex[:8])


def test_noise_is_a_function_of_seed_and_parameter(tiny_model_dir, tmp_path):
    _, _, params, *_ = _setup(tiny_model_dir, tmp_path)
    a = [z.clone() for _, _, z in noise_chunks(params[3], 99)]
    b = [z.clone() for _, _, z in noise_chunks(params[3], 99)]
    c = [z.clone() for _, _, z in noise_chunks(params[4], 99)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].flatten()[:8].tolist() != c[0].flatten()[:8].tolist()


def test_mezo_lowers_the_training_loss(tiny_model_dir, tmp_path):
    _, _, params, pert, task, ex = _setup(tiny_model_dir, tmp_path)
    batch = ex[:16]
    start = task.objective(batch)
    method = MeZO(params, pert, lr=5e-3, eps=1e-3, seed=0)
    for step in range(30):
        method.step(step, lambda: task.objective(batch))
    assert task.objective(batch) < start - 0.01


def test_apply_replays_a_step_exactly(tiny_model_dir, tmp_path):
    _, _, params, pert, task, ex = _setup(tiny_model_dir, tmp_path)
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


def test_trainable_patterns_limit_what_moves(tiny_model_dir, tmp_path):
    _, model, params, pert, task, ex = _setup(tiny_model_dir, tmp_path, trainable=["q_proj", "v_proj"])
    assert params and all(("q_proj" in p.name or "v_proj" in p.name) for p in params)
    frozen = {n: t.detach().clone() for n, t in model.named_parameters() if "q_proj" not in n and "v_proj" not in n}
    MeZO(params, pert, lr=1e-2, eps=1e-3).step(0, lambda: task.objective(ex[:4]))
    for n, t in model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], t), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_looked_up_rows_equal_the_materialised_table(monkeypatch, dtype):
    """Rows perturbed alone (embeddings, verbalizer rows) equal those rows of θ + αz, bit for bit,
    across noise chunks, for ids of any shape (repeats included)."""
    from torch import nn

    from edgezo import noise

    monkeypatch.setattr(noise, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk: many chunks
    emb = nn.Embedding(100, 64).to(dtype)
    (p,) = collect_params(emb, None)
    ids = torch.tensor([[3, 99, 3, 50, 0], [7, 8, 64, 63, 98], [1, 1, 1, 2, 13]])
    full = add_noise_into(torch.empty_like(p.param), p, 42, 1e-2)
    rows = noise.TorchNoise().rows(p, 42, 1e-2, ids)
    assert rows.shape == (3, 5, 64) and rows.dtype == dtype
    assert torch.equal(rows, full[ids])
    low = torch.tensor([0, 6, 2])  # only the first chunk is drawn
    assert torch.equal(noise.TorchNoise().rows(p, 42, 1e-2, low), full[low])
    pert = Perturber([p])
    with pert.active(42, 1e-2):
        assert torch.equal(emb(ids), full[ids])  # the embedding hook takes the same path
