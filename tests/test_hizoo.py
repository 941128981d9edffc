"""HiZOO: H learns the steeper coordinate, stays fp32 under bf16 weights, training, replay, resume, memory."""

from __future__ import annotations

import json

import pytest
import torch

from edgezo.hizoo import HiZOO
from edgezo.noise import TorchNoise, ZOParam
from edgezo.perturb import Perturber
from edgezo.spec import SpecError, load_spec
from edgezo.testing.tiny import PauseAt, job_weights, make_job, replayed, same_tensors
from edgezo.trainer import Paused, run_job


def _toy(dtype: torch.dtype, curv: list[float], smooth: float, lr: float = 0.0):
    """HiZOO on L(θ) = ½·Σ aᵢθᵢ² over one bare tensor (no model: the loss reads the perturbed θ)."""
    theta = torch.ones(len(curv), dtype=dtype)
    p = ZOParam(0, "theta", theta, [])
    pert = Perturber([p], TorchNoise())
    a = torch.tensor(curv, dtype=torch.float64)

    def loss() -> float:
        return float(0.5 * (a * pert.full(theta).double() ** 2).sum())

    return HiZOO([p], pert, smooth=smooth, lr=lr, eps=1e-2), loss, theta


def test_h_grows_more_along_the_steeper_coordinate():
    """The three-point curvature correlates with z_i² most where a_i is large (E[c·z_i²] ∝ 3a_i + Σ_j≠i a_j)."""
    method, loss, _ = _toy(torch.float32, [50.0, 1.0, 1.0, 1.0], smooth=1e-3)
    for t in range(400):
        method.step(t, loss)
    h = method.hess[0]
    assert h.dtype == torch.float32
    assert h[0] > 1.5 * h[1:].max(), h


def test_h_stays_fp32_and_moves_with_bf16_weights():
    """With bf16 weights the same average in the weights' dtype rounds back to 1 (why H is fp32)."""
    method, loss, theta = _toy(torch.bfloat16, [4.0, 1.0], smooth=1e-4)
    for t in range(20):
        method.step(t, loss)
    assert method.hess[0].dtype == torch.float32 and not torch.equal(method.hess[0], torch.ones(2))
    one = torch.ones(2, dtype=torch.bfloat16)
    assert torch.equal(one * (1 - 1e-4) + 1e-4 * 2.5 * one, one)  # underflow in bf16
    assert theta.dtype == torch.bfloat16


def test_update_follows_the_preconditioned_direction():
    """θ moves by −lr·g·H^(-1/2)·z with the refreshed H: a coordinate with large H moves less."""
    method, loss, theta = _toy(torch.float32, [1.0, 1.0], smooth=0.0, lr=0.1)
    method.hess[0].copy_(torch.tensor([100.0, 1.0]))
    before = theta.clone()
    rec = method.step(0, loss)
    z = method._noise().z(method.params[0], rec.seeds[0])
    expect = before - 0.1 * rec.grads[0] * z * torch.tensor([0.1, 1.0])
    assert torch.allclose(theta, expect, atol=1e-6)


def test_spec_refuses_hizoo_with_lowrank_directions(tiny_spec_dict):
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, "method": "hizoo", "optim": {"directions": "lowrank"}})
    assert e.value.field == "optim.directions"


KW = dict(method="hizoo", trainable="top1", steps=12, eval_size=0, snapshot_every=5, hizoo={"smooth": 1e-4},
          optim={"lr": 0.02, "eps": 1e-2, "perturbations": 2})



def test_hizoo_lowers_the_loss_and_reports_h(tmp_path, tiny_spec_dict):
    job = make_job(tmp_path, tiny_spec_dict, "job", **{**KW, "steps": 30, "snapshot_every": 0})
    report = run_job(job)
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["kind"] == "step"]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    trainable = next(e["trainable_params"] for e in events if e["kind"] == "start")
    assert report["memory"]["method_state_bytes"] == 4 * trainable  # H: one fp32 value per trainable element


def test_hizoo_resume_from_a_snapshot_equals_an_uninterrupted_run_and_replay(tmp_path, tiny_spec_dict):
    ref = make_job(tmp_path, tiny_spec_dict, "ref", **KW)
    run_job(ref)
    job = make_job(tmp_path, tiny_spec_dict, "paused", **KW)
    with pytest.raises(Paused):
        run_job(job, PauseAt(8))  # a snapshot (weights + H) at step 4, steps 5-7 replayed onto it
    assert list((job / "snapshots").glob("optim-*.safetensors"))
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert same_tensors(job_weights(ref), replayed(tmp_path, ref))
