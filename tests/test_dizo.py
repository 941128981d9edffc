"""DiZO: projection identity, clipping, θ₀ placement, replay, and FO-phase memory."""

from __future__ import annotations

import gc

import pytest
import torch

from edgezo.data import read_rows
from edgezo.dizo import DiZO, ProjectionRecord, projected
from edgezo.models import load
from edgezo.perturb import Perturber, collect_params
from edgezo.spec import load_spec
from edgezo.tasks import make_task
from edgezo.testing.tiny import tiny_spec


def _setup(model_dir, tmp_path, projection="zo", device="cpu", **dizo):
    spec = load_spec(tiny_spec(model_dir, tmp_path / "data", method="dizo",
                               dizo={"interval": 3, "projection": projection, "iters": 3, **dizo}))
    dev = torch.device(device)
    model, tok, path = load(spec["model"], "fp32", dev)
    params = collect_params(model, None)
    pert = Perturber(params)
    task = make_task(spec["task"], model, tok, pert, 32, dev)
    ex = task.encode(read_rows(spec["task"]["train"], "task.train"), "train")
    method = DiZO(params, pert, dizo=spec["dizo"], model_path=path, model=model, lr=1e-2, eps=1e-3, seed=0)
    return method, task, ex, params


def _train(method, task, ex, steps):
    for s in range(steps):
        method.step(s, lambda s=s: task.objective(ex[(s % 8) * 4 : (s % 8 + 1) * 4]))


def test_projection_with_gamma_equal_norm_is_the_identity(tiny_model_dir, tmp_path):
    method, task, ex, params = _setup(tiny_model_dir, tmp_path)
    _train(method, task, ex, 3)
    before = {p.name: p.param.detach().clone() for p in params}
    norms = method._norms()
    method.apply_projection(ProjectionRecord(step=2, mode="zo",
                                             layers=[(p.index, n, n) for p, n in zip(method.layers, norms)]))
    assert all(torch.equal(before[p.name], p.param) for p in params)


@pytest.mark.parametrize("projection", ["zo", "fo"])
def test_learned_ratios_stay_inside_the_clip_range(tiny_model_dir, tmp_path, projection):
    method, task, ex, _ = _setup(tiny_model_dir, tmp_path, projection=projection, clip=0.1, lr=50.0, fo_lr=0.5)
    _train(method, task, ex, 3)
    rec = method.project(2, lambda: task.objective(ex[:4]), lambda: task.loss(ex[:4]))
    ratios = [g / n for _, g, n in rec.layers]
    assert all(0.9 - 1e-9 <= r <= 1.1 + 1e-9 for r in ratios)
    assert any(abs(r - 1.0) > 1e-6 for r in ratios), "projection learnt nothing"
    # The weights now sit at θ₀ + r·Δθ for each projected layer.
    for (_, g, _n), p in zip(rec.layers, method.layers):
        assert torch.linalg.vector_norm(p.param.float() - method.theta0.get(p).float()).item() == pytest.approx(g, rel=1e-4)


def test_projects_only_query_and_value_by_default(tiny_model_dir, tmp_path):
    method, *_ = _setup(tiny_model_dir, tmp_path)
    assert method.layers and all(("q_proj" in p.name or "v_proj" in p.name) for p in method.layers)


def test_theta0_is_read_from_the_base_file_not_held_in_memory(tiny_model_dir, tmp_path):
    method, *_ = _setup(tiny_model_dir, tmp_path)
    assert method.theta0.mode() == "mmap" and method.theta0.host_bytes() == 0
    # Nothing on the model's device holds θ₀: every tensor reachable from the method is a live weight.
    live = {t.data_ptr() for t in method.model.parameters()}
    for p in method.layers:
        t0 = method.theta0.get(p)
        assert t0.data_ptr() not in live


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fo_projection_releases_its_memory_every_phase(tiny_model_dir, tmp_path):
    method, task, ex, _ = _setup(tiny_model_dir, tmp_path, projection="fo")

    def live_tensor_bytes() -> int:
        gc.collect()
        total = 0
        for o in gc.get_objects():
            try:
                if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter):
                    total += o.numel() * o.element_size()
            except ReferenceError:
                continue
        return total

    _train(method, task, ex, 3)
    baseline = None
    for phase in range(5):
        method.project(2 + phase, lambda: task.objective(ex[:4]), lambda: task.loss(ex[:4]))
        now = live_tensor_bytes()
        baseline = baseline if baseline is not None else now
        assert now <= baseline, f"phase {phase}: {now - baseline} bytes more tensors alive than after phase 0"
    assert all(p.param.grad is None for p in method.params)


def test_projected_formula_is_exact_at_ratio_zero():
    theta0 = torch.randn(4, 4)
    theta = theta0 + 0.01 * torch.randn(4, 4)
    assert torch.equal(projected(theta, theta0, 0.0), theta0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_theta0_not_on_the_accelerator_cuda(tiny_model_dir, tmp_path):
    torch.cuda.synchronize()
    method, task, ex, _ = _setup(tiny_model_dir, tmp_path, device="cuda")
    steady = torch.cuda.memory_allocated()
    _train(method, task, ex, 3)
    method.project(2, lambda: task.objective(ex[:4]), lambda: task.loss(ex[:4]))
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= steady


def _job(tmp_path, model_dir, name, **dizo):
    from edgezo.trainer import prepare_job_dir

    spec = load_spec(tiny_spec(model_dir, tmp_path / "data", method="dizo", steps=10, eval_size=0,
                               snapshot_every=4, dizo={"interval": 3, "iters": 2, **dizo}))
    return prepare_job_dir(tmp_path / name, spec)


def _out_weights(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("projection", ["zo", "fo"])
def test_replay_after_dizo_steps_is_bit_exact(tiny_model_dir, tmp_path, projection):
    from edgezo.cli import main as cli_main
    from edgezo.trainer import run_job

    job = _job(tmp_path, tiny_model_dir, "job", projection=projection)
    run_job(job)
    trained = _out_weights(job / "tiny")
    for flags in ([], ["--from-base"]):
        out = tmp_path / f"replay{len(flags)}"
        assert cli_main(["replay", str(job), "--out", str(out), *flags]) == 0
        replayed = _out_weights(out)
        assert trained.keys() == replayed.keys()
        assert all(torch.equal(trained[k], replayed[k]) for k in trained), flags
    events = (job / "events.jsonl").read_text()
    assert events.count('"kind": "projection"') == 3  # after steps 2, 5, 8


def test_a_heavy_projection_waits_for_its_lease_and_is_never_dropped(tiny_model_dir, tmp_path):
    from edgezo.hooks import TrainerHooks
    from edgezo.trainer import run_job

    class Stingy(TrainerHooks):
        """Refuses every other projection lease request; records what was asked."""

        def __init__(self):
            self.asked, self.granted = 0, []

        def try_lease(self, phase, nbytes):
            if phase != "projection":
                return True
            self.asked += 1
            ok = self.asked % 3 == 0
            if ok:
                self.granted.append(nbytes)
            return ok

    hooks = Stingy()
    job = _job(tmp_path, tiny_model_dir, "stingy", projection="fo")
    run_job(job, hooks)
    import json

    projections = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()
                   if '"kind": "projection"' in line]
    assert len(projections) == 3 and len(hooks.granted) == 3 and all(n > 0 for n in hooks.granted)
    assert [p["step"] for p in projections] != [2, 5, 8]  # deferred past the due steps, still all run
