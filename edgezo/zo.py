"""Zeroth-order optimisers: one interface, MeZO (ZO-SGD) first.

A method turns "loss under perturbation (seed, ±ε)" into an update and a seed-log record. The record
holds everything needed to redo the update without any forward pass (seeds, projected gradients,
lr), which is what makes replay and resume cheap and exact.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edgezo.noise import ZOParam, mix
from edgezo.perturb import Perturber


@dataclass
class StepRecord:
    """What the seed-log stores for one step."""

    step: int
    seeds: list[int]
    grads: list[float]  # projected gradient per perturbation, (L+ − L−)/2ε
    lr: float
    weight_decay: float
    loss: float = float("nan")  # mean of L+ and L− (progress display only; not needed for replay)
    extra: dict = field(default_factory=dict)


def lr_at(step: int, lr: float, total: int, schedule: str) -> float:
    if schedule == "linear" and total > 0:
        return lr * max(0.0, 1.0 - step / total)
    return lr


def step_seed(job_seed: int, step: int, k: int) -> int:
    """The seed of perturbation k at `step`: a pure function, so resume never needs saved RNG state."""
    return mix(job_seed, step, k)


LossFn = Callable[[], float]


class ZOMethod(ABC):
    """Interface every ZO method implements (MeZO now; DiZO, HiZOO, KerZOO, PseuZO plug in here)."""

    name = "base"

    def __init__(self, params: list[ZOParam], perturber: Perturber, *, lr: float, eps: float,
                 weight_decay: float = 0.0, perturbations: int = 1, schedule: str = "constant",
                 total_steps: int = 0, seed: int = 0):
        self.params = params
        self.perturber = perturber
        self.lr, self.eps, self.wd = lr, eps, weight_decay
        self.q, self.schedule, self.total, self.seed = perturbations, schedule, total_steps, seed

    @abstractmethod
    def step(self, step: int, loss_fn: LossFn) -> StepRecord:
        """Spend forward passes, update the weights, return the record that redoes the update."""

    @abstractmethod
    def apply(self, rec: StepRecord) -> None:
        """Redo a logged update with no forward pass (replay, resume)."""


class MeZO(ZOMethod):
    """Two-point SPSA with Gaussian directions regenerated from seeds (Malladi et al., 2023)."""

    name = "mezo"

    def two_point(self, step: int, k: int, loss_fn: LossFn) -> tuple[int, float, float]:
        """Direction k of `step`: its seed and the losses at θ + ε·z and θ − ε·z."""
        s = step_seed(self.seed, step, k)
        with self.perturber.active(s, +self.eps):
            lp = loss_fn()
        with self.perturber.active(s, -self.eps):
            lm = loss_fn()
        return s, lp, lm

    @torch.no_grad()
    def step(self, step: int, loss_fn: LossFn) -> StepRecord:
        seeds, grads, losses = [], [], []
        for k in range(self.q):
            s, lp, lm = self.two_point(step, k, loss_fn)
            seeds.append(s)
            grads.append((lp - lm) / (2.0 * self.eps))
            losses.extend([lp, lm])
        rec = StepRecord(step=step, seeds=seeds, grads=grads,
                         lr=lr_at(step, self.lr, self.total, self.schedule), weight_decay=self.wd,
                         loss=sum(losses) / len(losses))
        self.apply(rec)
        return rec

    @torch.no_grad()
    def apply(self, rec: StepRecord) -> None:
        """θ ← θ·(1 − lr·wd) − lr/q · Σ_k g_k z_k  (decay only on matrices, as in MeZO)."""
        q = len(rec.seeds)
        if rec.weight_decay:
            for p in self.params:
                if p.param.dim() >= 2:
                    p.param.mul_(1.0 - rec.lr * rec.weight_decay)
        for s, g in zip(rec.seeds, rec.grads):  # per tensor: decay, then each direction in order, as before
            alpha = -rec.lr * g / q
            if alpha != 0.0:
                self.perturber.noise.update(self.params, s, alpha)


class FZOO(MeZO):
    """Normalised one-sided estimator over N directions (in the spirit of FZOO, Dang et al., 2025).

    One unperturbed loss L₀ and N perturbed ones Lₖ = L(θ + ε·zₖ); each direction's coefficient is
    (Lₖ − L₀)/σ with σ the spread (sample std) of the N perturbed losses, and the update is
    θ ← θ − lr/N · Σₖ coefₖ·zₖ. Dividing by σ makes the step scale-free: the coefficients are O(1)
    whatever the loss's scale or ε, so lr is a distance in units of z and needs no grid over decades.
    The record holds the coefficients (and σ, L₀ for the audit), so the update replays exactly as
    MeZO's does. With a frozen prefix (edgezo/prefix.py) L₀ costs the one full forward of the step
    and each direction only the trainable top of the network.
    """

    name = "fzoo"

    @torch.no_grad()
    def step(self, step: int, loss_fn: LossFn) -> StepRecord:
        base = getattr(loss_fn, "base", None)
        l0 = base() if base is not None else loss_fn()
        seeds, losses = [], []
        for k in range(self.q):
            s = step_seed(self.seed, step, k)
            with self.perturber.active(s, +self.eps):
                losses.append(loss_fn())
            seeds.append(s)
        mean = sum(losses) / len(losses)
        spread = math.sqrt(sum((v - mean) ** 2 for v in losses) / max(1, len(losses) - 1))
        if not math.isfinite(spread) or spread <= 1e-12 * max(1.0, abs(l0)):
            grads = [0.0 if math.isfinite(v - l0) else v - l0 for v in losses]  # flat: no step; NaN: caller stops
        else:
            grads = [(v - l0) / spread for v in losses]
        rec = StepRecord(step=step, seeds=seeds, grads=grads,
                         lr=lr_at(step, self.lr, self.total, self.schedule), weight_decay=self.wd,
                         loss=l0, extra={"spread": spread})
        self.apply(rec)
        return rec


METHODS: dict[str, type[ZOMethod]] = {"mezo": MeZO, "fzoo": FZOO}
