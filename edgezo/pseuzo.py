"""PseuZO: zeroth-order Jacobians of the model's outputs, the exact gradient of the loss in them
(after PseuZO, Yang et al., NeurIPS 2025).

The loss is a cheap function g of the model's outputs o = h(θ) (classification: the [batch, labels]
verbalizer logits). MeZO differences g∘h; PseuZO differences h alone and takes g's gradient exactly:

    e = ∂g/∂o = (softmax(o) − onehot(y)) / batch              (exact; the head's loss only)
    Δₖ = (h(θ + ε·zₖ) − h(θ)) / ε ≈ J·zₖ                      (one perturbed forward a direction)
    gₖ = ⟨Δₖ, e⟩ ≈ zₖᵀ·∇L                                     (g's curvature drops out)

and the update is θ ← θ − lr·Σ wₖ·gₖ·zₖ. The Jacobian estimate J ≈ Σ w·Δ·zᵀ is an exponential moving
average over a sliding window of the last `pseuzo.window` steps (weights β^age, normalised to sum
to 1), re-weighted every step by the current e: old directions are regenerated from their seeds,
never stored. A step costs 1 + q forwards (MeZO's: 2q) and window·q noise passes for the update.

Past steps ran on other sentences, so their per-example Δ cannot meet this batch's per-example e.
The reference code pairs rows by position in the batch (a random pairing after shuffling); here
each past step keeps its Δ averaged per gold label ([labels, labels] numbers a direction) and meets
the current e summed per gold label, so a past direction counts by how it moved the outputs of
sentences of each class. The current step's own term is exact per example. `window: 1` is the
estimator without the average.

Memory beyond MeZO: the window, (window − 1)·q·labels² float64 numbers and their seeds (bytes, not
megabytes; `state_bytes`). Classification only (spec error otherwise): for generation the outputs
are [batch, length, vocabulary] per step.

Replay and resume: the record's seeds and coefficients are the whole update (the window's old
seeds included), and its `means` (the class-averaged Δ) are what `apply` pushes onto the window, so
replaying the log rebuilds the window and the weights bit for bit; snapshots carry the window.
"""

from __future__ import annotations

from collections import deque

import torch

from edgezo.noise import ZOParam
from edgezo.perturb import Perturber
from edgezo.zo import LossFn, MeZO, StepRecord, lr_at, step_seed


def loss_gradient(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """∂ mean cross-entropy / ∂ logits, exactly, in float64."""
    p = torch.softmax(logits.double(), dim=1)
    p[torch.arange(len(labels)), labels] -= 1.0
    return p / len(labels)


def per_class(rows: torch.Tensor, labels: torch.Tensor, classes: int, mean: bool) -> torch.Tensor:
    """[classes, width]: the rows of each gold label summed (or averaged; a missing class is 0)."""
    out = torch.zeros(classes, rows.shape[1], dtype=torch.float64).index_add_(0, labels, rows.double())
    if mean:
        counts = torch.bincount(labels, minlength=classes).clamp(min=1).double()
        out /= counts[:, None]
    return out


class PseuZO(MeZO):
    name = "pseuzo"

    def __init__(self, params: list[ZOParam], perturber: Perturber, *, window: int, beta: float, **common):
        super().__init__(params, perturber, **common)
        self.window, self.beta = window, beta
        self.past: deque[tuple[list[int], list]] = deque(maxlen=window - 1)

    def reset_state(self) -> None:
        self.past.clear()

    def state_bytes(self) -> int:
        """The window: per past step and direction a seed and labels² float64 numbers."""
        return sum(len(seeds) * 8 + sum(len(m) * len(m[0]) * 8 for m in means) for seeds, means in self.past)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.past:
            return {"window.empty": torch.zeros(1)}
        return {"window.seeds": torch.tensor([s for s, _ in self.past], dtype=torch.int64),
                "window.means": torch.tensor([m for _, m in self.past], dtype=torch.float64)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.past.clear()
        if "window.seeds" in state:
            for seeds, means in zip(state["window.seeds"].tolist(), state["window.means"].tolist()):
                self.past.append((seeds, means))

    def _weights(self) -> list[float]:
        w = [self.beta**age for age in range(len(self.past) + 1)]
        total = sum(w)
        return [x / total for x in w]

    @torch.no_grad()
    def step(self, step: int, loss_fn: LossFn) -> StepRecord:
        o0 = loss_fn.outputs(base=True)
        labels = torch.tensor([e.label for e in loss_fn.batch], device=o0.device)
        e = loss_gradient(o0, labels).cpu()
        labels = labels.cpu()
        classes = o0.shape[1]
        e_class = per_class(e, labels, classes, mean=False)
        w = self._weights()
        seeds, grads, means = [], [], []
        for k in range(self.q):
            s = step_seed(self.seed, step, k)
            with self.perturber.active(s, +self.eps):
                d = (loss_fn.outputs().double() - o0.double()).cpu() / self.eps
            seeds.append(s)
            grads.append(w[0] * float((d * e).sum()) / self.q)
            means.append(per_class(d, labels, classes, mean=True).tolist())
        for age, (old_seeds, old_means) in enumerate(reversed(self.past), start=1):
            for s, m in zip(old_seeds, old_means):
                seeds.append(s)
                grads.append(w[age] * float((torch.tensor(m, dtype=torch.float64) * e_class).sum()) / len(old_seeds))
        rec = StepRecord(step=step, seeds=seeds, grads=grads,
                         lr=lr_at(step, self.lr, self.total, self.schedule), weight_decay=self.wd,
                         loss=loss_fn.base(), extra={"fresh": self.q, "means": means})
        self.apply(rec)
        return rec

    @torch.no_grad()
    def apply(self, rec: StepRecord) -> None:
        """θ ← θ·(1 − lr·wd) − lr·Σₖ gₖ·zₖ over the step's and the window's directions; then the
        step's class-averaged output changes join the window."""
        if rec.weight_decay:
            for p in self.params:
                if p.param.dim() >= 2:
                    p.param.mul_(1.0 - rec.lr * rec.weight_decay)
        for s, g in zip(rec.seeds, rec.grads):
            if g != 0.0:
                self.perturber.noise.update(self.params, s, -rec.lr * g)
        if self.past.maxlen:
            fresh = rec.extra["fresh"]
            self.past.append((list(rec.seeds[:fresh]), rec.extra["means"]))
