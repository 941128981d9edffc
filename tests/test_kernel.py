"""`edgezo kernel`: the ZO-eNTK's error shrinks with q, matches its Gaussian expectation whatever the
parameter count, and its two halves (exact Jacobian, ZO tangents) agree with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgezo.kernel import gaussian_error, jacobian, zo_tangents
from edgezo.noise import ZOParam
from edgezo.spec import load_spec
from edgezo.tasks import make_task
from edgezo.testing.tiny import make_model_dir, tiny_spec
from edgezo.trainer import build_engine


def test_a_zo_tangent_is_the_jacobian_times_the_direction(tiny_spec_dict):
    """(h(θ+εz) − h(θ−εz))/2ε from two perturbed forwards equals J·z from the backward pass, with z
    regenerated from the same seed: the exact and the ZO side measure the same thing."""
    from edgezo.data import read_rows

    spec = load_spec({**tiny_spec_dict, "trainable": "full"})
    engine = build_engine(spec)
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"], engine.device)
    batch = task.encode(read_rows(spec["task"]["train"], "task.train")[:4], "task.train")
    jac = jacobian(task, engine, batch)
    assert jac.shape == (8, sum(p.param.numel() for p in engine.params))
    seed = 1234
    zeros = [torch.zeros_like(p.param) for p in engine.params]  # z = 0 + 1·z, as the stream writes it
    z = torch.cat([engine.perturber.noise.add_into(b, ZOParam(p.index, p.name, b, []), seed, 1.0).reshape(-1)
                   for p, b in zip(engine.params, zeros)])
    tangent = zo_tangents(task, engine, batch, [seed], 1e-3)[0]
    assert torch.allclose(tangent.float(), jac @ z, rtol=2e-2, atol=2e-3 * float((jac @ z).abs().max()))


def test_gaussian_expectation_is_what_sampling_gives():
    """E‖K̂−K‖² = (‖K‖² + tr(K)²)/q for K̂ from q Gaussian J z: checked by sampling a known J."""
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(6, 200, generator=g, dtype=torch.float64)
    k = jac @ jac.T
    for q in (1, 8):
        errs = []
        for _ in range(400):
            t = jac @ torch.randn(200, q, generator=g, dtype=torch.float64)
            errs.append(float(torch.linalg.matrix_norm(t @ t.T / q - k) ** 2 / torch.linalg.matrix_norm(k) ** 2))
        assert (sum(errs) / len(errs)) ** 0.5 == pytest.approx(gaussian_error(k, q), rel=0.1)


def test_edgezo_kernel_on_two_model_sizes(tmp_path):
    """The CLI on two tiny models 11x apart in parameters: the error falls with q and, at q = 64,
    sits near the Gaussian expectation for both (it depends on q and K's spectrum, not on P)."""
    rows = {}
    for hidden in (32, 128):
        spec = tmp_path / f"spec-{hidden}.json"
        spec.write_text(json.dumps(tiny_spec(make_model_dir(tmp_path / f"m{hidden}", hidden=hidden),
                                             tmp_path / "data", trainable="full")))
        out = subprocess.run([sys.executable, "-m", "edgezo.cli", "kernel", str(spec), "--perturbations", "1,16,64",
                              "--trials", "3", "--json", "--plot", str(tmp_path / f"k{hidden}.png")],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        rows[hidden] = {r["q"]: r for r in json.loads(out.stdout)}
        assert (tmp_path / f"k{hidden}.png").stat().st_size > 10_000
    assert rows[128][1]["params"] > 10 * rows[32][1]["params"]
    for by_q in rows.values():
        assert by_q[64]["error"] < 0.5 * by_q[1]["error"]
        assert by_q[64]["error"] < 0.6 * by_q[1]["gaussian"]
        assert 0.5 < by_q[64]["error"] / by_q[64]["gaussian"] < 2.0


def test_edgezo_kernel_refuses_what_it_cannot_measure(tmp_path, tiny_spec_dict):
    spec = tmp_path / "gen.json"
    spec.write_text(json.dumps({**tiny_spec_dict, "task": {**tiny_spec_dict["task"], "type": "generation"}}))
    out = subprocess.run([sys.executable, "-m", "edgezo.cli", "kernel", str(spec)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and "task.type must be classification" in out.stderr
    out = subprocess.run([sys.executable, "-m", "edgezo.cli", "kernel", str(Path(spec)), "--perturbations", "0,4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "positive integers" in out.stderr
