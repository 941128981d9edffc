"""The ZO-eNTK diagnostic: how many perturbations a model and task need (`edgezo kernel`).

One step of ZO-SGD moves the outputs o = h(θ) of a batch by −lr·K̂·∂L/∂o, where K̂ = (1/q)·Σₖ (J zₖ)(J zₖ)ᵀ
is the empirical NTK K = J Jᵀ (J = ∂o/∂θ, m outputs × P parameters) seen through q random directions.
The ZO-eNTK analysis (../shared/seeds/000) argues that K̂'s fidelity depends on q and on the outputs,
not on P. This module measures it on a few training sentences:

- K exactly, from one backward per output (m = sentences × labels) over the trainable set;
- K̂ from q directions drawn as a job draws them (the spec's noise stream and direction kind), each
  J z estimated the ZO way, by a central difference of two perturbed forwards (h(θ+εz) − h(θ−εz))/2ε;
- the relative Frobenius error ‖K̂ − K‖ / ‖K‖, averaged over trials (the q's are nested prefixes of
  one draw of directions per trial), next to the value expected for Gaussian directions,
  √((1 + tr(K)²/‖K‖²)/q): a function of K's spectrum and q only.

The exact part keeps J (m × P float32), so it suits small trainable sets or small models; a larger
one is refused with the numbers. Classification only (its outputs are the verbalizer logits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgezo.protocol import EdgezoError
from edgezo.zo import step_seed

MAX_JACOBIAN_BYTES = 4 << 30  # J kept in fp32; beyond this, fewer sentences or a smaller trainable set


@dataclass(frozen=True)
class KernelRow:
    """One line of the diagnostic: a trainable set, q, and the relative error of its ZO-eNTK."""

    model: str  # the spec's model (its directory's name)
    trainable: str
    params: int  # trainable parameters P
    outputs: int  # m = sentences × labels
    q: int  # perturbations
    error: float  # ‖K̂ − K‖_F / ‖K‖_F, mean over trials
    spread: float  # its standard deviation over trials
    gaussian: float  # the expected value for Gaussian directions, from K alone

    def as_dict(self) -> dict:
        return asdict(self)


def jacobian(task, engine, batch) -> torch.Tensor:
    """J [m, P] float32: the batch's label logits (flattened) against the trainable tensors, in
    engine.params order, each tensor flattened."""
    tensors = [p.param for p in engine.params]
    flags = [t.requires_grad for t in tensors]
    if task.prefix is not None:
        task.prefix.clear()
    try:
        for t in tensors:
            t.requires_grad_(True)
        # overridden: every trainable tensor answers as itself, so the head's rows and swapped-in
        # weights stay on the autograd graph (the Perturber detaches them otherwise).
        with torch.enable_grad(), engine.perturber.overridden(lambda p: p.param):
            out = task.logits(batch).reshape(-1)
            m = out.numel()
            rows = []
            for i in range(m):
                grads = torch.autograd.grad(out[i], tensors, retain_graph=i < m - 1, allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1).float()
                                       for g, t in zip(grads, tensors)]))
    finally:
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)
    return torch.stack(rows)


@torch.no_grad()
def zo_tangents(task, engine, batch, seeds: list[int], eps: float) -> torch.Tensor:
    """[q, m]: each direction's J z by a central difference, as a ZO step sees it."""
    if task.prefix is not None:
        task.prefix.clear()
    out = []
    for s in seeds:
        with engine.perturber.active(s, +eps):
            plus = task.logits(batch).reshape(-1).double()
        with engine.perturber.active(s, -eps):
            minus = task.logits(batch).reshape(-1).double()
        out.append((plus - minus) / (2.0 * eps))
    return torch.stack(out)


def relative_error(k_hat: torch.Tensor, k: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(k_hat - k) / torch.linalg.matrix_norm(k))


def gaussian_error(k: torch.Tensor, q: int) -> float:
    """√E‖K̂ − K‖²/‖K‖ for K̂ from q Gaussian directions: E‖K̂−K‖² = (‖K‖² + tr(K)²)/q."""
    fro2 = float((k * k).sum())
    return math.sqrt((1.0 + float(torch.trace(k)) ** 2 / fro2) / q)


def measure(spec: dict, perturbations: list[int], *, examples: int = 8, trials: int = 3,
            eps: float | None = None) -> list[KernelRow]:
    """The diagnostic for one spec (its model, trainable set, noise stream and first train sentences)."""
    from edgezo.data import data_path, read_rows
    from edgezo.tasks import make_task
    from edgezo.trainer import build_engine

    if spec["task"]["type"] != "classification":
        raise EdgezoError("edgezo kernel: task.type must be classification (its outputs are the label logits)")
    if spec["precision"] == "int8":
        raise EdgezoError("edgezo kernel: precision int8 has no exact Jacobian here; use fp32 (the kernel is a "
                          "property of the model, not of how it is stored)")
    engine = build_engine({**spec, "steps": 0})
    n_params = sum(p.param.numel() for p in engine.params)
    labels = len(spec["task"]["labels"])
    m = examples * labels
    if m * n_params * 4 > MAX_JACOBIAN_BYTES:
        raise EdgezoError(f"edgezo kernel: the exact Jacobian of {m} outputs in {n_params:,} parameters would take "
                          f"{m * n_params * 4 / 2**30:.1f} GiB; use fewer --examples or a smaller trainable set "
                          "(e.g. --set trainable=top1)")
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"], engine.device)
    batch = task.encode(read_rows(data_path(spec["task"]["train"], "train"), "task.train")[:examples], "task.train")
    jac = jacobian(task, engine, batch).double()
    k = jac @ jac.T
    del jac
    if float(torch.linalg.matrix_norm(k)) == 0.0:
        raise EdgezoError("edgezo kernel: the exact eNTK is zero (no trainable tensor reaches the outputs)")
    eps = eps if eps is not None else spec["optim"]["eps"]
    top = max(perturbations)
    errors: dict[int, list[float]] = {q: [] for q in perturbations}
    for t in range(trials):
        tangents = zo_tangents(task, engine, batch, [step_seed(spec["seed"], t, j) for j in range(top)], eps)
        for q in perturbations:
            errors[q].append(relative_error(tangents[:q].T @ tangents[:q] / q, k))
    rows = []
    for q in perturbations:
        e = torch.tensor(errors[q], dtype=torch.float64)
        rows.append(KernelRow(model=Path(str(spec["model"])).name, trainable=str(spec["trainable"]), params=n_params, outputs=len(batch) * labels, q=q,
                              error=float(e.mean()), spread=float(e.std()) if len(e) > 1 else 0.0,
                              gaussian=gaussian_error(k, q)))
    return rows


def table(rows: list[KernelRow]) -> str:
    lines = ["| model | trainable | parameters | outputs | q | rel. error ‖K̂−K‖/‖K‖ | Gaussian expectation |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.trainable} | {r.params:,} | {r.outputs} | {r.q} | {r.error:.3f} ± {r.spread:.3f} "
                     f"| {r.gaussian:.3f} |")
    return "\n".join(lines)


def plot(rows: list[KernelRow], path: str) -> None:
    """Relative error against q, log-log, a line per (model, trainable set), its Gaussian expectation dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[KernelRow]] = {}
    for r in rows:
        groups.setdefault(f"{r.model} {r.trainable} (P = {r.params:,})", []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, rs in groups.items():
        line, = ax.plot([r.q for r in rs], [r.error for r in rs], marker="o", label=label)
        ax.plot([r.q for r in rs], [r.gaussian for r in rs], linestyle="--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("perturbations q")
    ax.set_ylabel("‖K̂ − K‖ / ‖K‖")
    ax.set_title("ZO-eNTK fidelity (dashed: Gaussian expectation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
