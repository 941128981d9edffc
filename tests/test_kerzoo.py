"""KerZOO: the kernel weights cancel the two-point estimator's cubic bias; training, replay, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgezo.kerzoo import kernel, radius
from edgezo.testing.tiny import PauseAt, job_weights, make_job, replayed, same_tensors
from edgezo.trainer import Paused, run_job


def _expect_over_r(f) -> float:
    """E[f(r)] for r uniform in [-1, 1], exactly for polynomials up to degree 39 (Gauss-Legendre)."""
    x, w = np.polynomial.legendre.leggauss(20)
    return float(sum(wi * f(xi) for xi, wi in zip(x, w)) / 2.0)


def test_the_kernel_cancels_the_cubic_bias_that_mezo_keeps():
    """Along a direction z the loss is a·t + b·t³. MeZO's two-point coefficient is a·z + b·ε²·z³ (biased
    by b·ε²·z³); KerZOO's, weighted by K(r) at radius ε·r, averages over r to a·z exactly."""
    a, b, eps, z = 0.7, 5.0, 0.1, 1.3

    def loss(t: float) -> float:
        return a * t + b * t**3

    mezo = (loss(eps * z) - loss(-eps * z)) / (2 * eps)
    kerzoo = _expect_over_r(lambda r: (loss(eps * r * z) - loss(-eps * r * z)) / (2 * eps) * kernel(r))
    assert mezo - a * z == pytest.approx(b * eps**2 * z**3)
    assert kerzoo == pytest.approx(a * z, abs=1e-12)
    assert _expect_over_r(lambda r: r * kernel(r)) == pytest.approx(1.0)
    assert _expect_over_r(kernel) == pytest.approx(0.0, abs=1e-12)


def test_radii_are_a_pure_function_of_the_seed_and_fill_the_interval():
    rs = [radius(s) for s in range(4000)]
    assert rs == [radius(s) for s in range(4000)]
    assert all(-1.0 <= r < 1.0 for r in rs)
    assert abs(np.mean(rs)) < 0.05 and abs(np.mean(np.square(rs)) - 1 / 3) < 0.02


KW = dict(method="kerzoo", trainable="top1", steps=12, eval_size=0, snapshot_every=5,
          optim={"lr": 0.02, "eps": 1e-2, "perturbations": 4, "schedule": "constant"})



def _losses(job):
    return [e["loss"] for e in map(json.loads, (job / "events.jsonl").read_text().splitlines()) if e["kind"] == "step"]


def test_kerzoo_lowers_the_training_loss_and_logs_its_radii(tmp_path, tiny_spec_dict):
    job = make_job(tmp_path, tiny_spec_dict, "job", **{**KW, "steps": 30, "snapshot_every": 0})
    run_job(job)
    losses = _losses(job)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    from edgezo import seedlog

    steps = list(seedlog.body(seedlog.read(job / "seedlog.ezl")[1], seedlog.STEP))
    assert len(steps[0]["radii"]) == 4 and steps[-1]["eps"] < steps[0]["eps"] == pytest.approx(1e-2)


def test_kerzoo_resume_equals_an_uninterrupted_run_and_replay(tmp_path, tiny_spec_dict):
    ref = make_job(tmp_path, tiny_spec_dict, "ref", **KW)
    run_job(ref)
    job = make_job(tmp_path, tiny_spec_dict, "paused", **KW)
    with pytest.raises(Paused):
        run_job(job, PauseAt(7))
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert same_tensors(job_weights(ref), replayed(tmp_path, ref))
