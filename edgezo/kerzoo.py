"""KerZOO: a kernel-weighted two-point estimator whose low-order bias cancels (after KerZOO, 2025).

A two-point estimate (L(θ+εz) − L(θ−εz))/2ε · z is the directional derivative plus a bias of order
ε²: the third-order terms of the loss along z. Kernel smoothing (Polyak–Tsybakov) removes it: each
direction k also draws a radius rₖ uniform in [−1, 1], perturbs by ±ε·rₖ·zₖ, and weights its
estimate by a kernel K with E[r·K(r)] = 1 and E[r³·K(r)] = 0, here K(r) = 15/4 · r · (5 − 7r²):

    gₖ = (L(θ + ε rₖ zₖ) − L(θ − ε rₖ zₖ)) / 2ε · K(rₖ)        E[gₖ zₖ] = ∇L + O(ε⁴)

ε decays linearly to a tenth of `optim.eps` over the run (the radius schedule: wide early, when the
loss is rough, fine late). Several directions a step (`optim.perturbations`) average the kernel's
extra variance down. Nothing is kept between steps: no memory beyond MeZO's.

The record is MeZO's (seeds and one coefficient gₖ per direction), so replay and resume redo the
update exactly with no forward; the radii and ε used are logged for the audit (`extra`), and rₖ is a
pure function of the direction's seed.
"""

from __future__ import annotations

import torch

from edgezo.noise import mix
from edgezo.zo import LossFn, MeZO, StepRecord, lr_at, step_seed

_RADIUS_SALT = 0x4B45525A  # "KERZ": keeps a direction's radius independent of its noise


def radius(seed: int) -> float:
    """A direction's radius in [−1, 1), a pure function of its seed."""
    return 2.0 * (mix(seed, _RADIUS_SALT) % 2**53) / 2**53 - 1.0


def kernel(r: float) -> float:
    """K(r) = 15/4·r·(5 − 7r²): E[r·K] = 1 and E[r³·K] = 0 for r uniform in [−1, 1]."""
    return 3.75 * r * (5.0 - 7.0 * r * r)


class KerZOO(MeZO):
    name = "kerzoo"

    def eps_at(self, step: int) -> float:
        """The radius schedule: ε at the start, a tenth of it at the last step."""
        if self.total <= 0:
            return self.eps
        return self.eps * (1.0 - 0.9 * min(step, self.total) / self.total)

    @torch.no_grad()
    def step(self, step: int, loss_fn: LossFn) -> StepRecord:
        eps = self.eps_at(step)
        seeds, grads, losses, radii = [], [], [], []
        for k in range(self.q):
            s = step_seed(self.seed, step, k)
            r = radius(s)
            with self.perturber.active(s, +eps * r):
                lp = loss_fn()
            with self.perturber.active(s, -eps * r):
                lm = loss_fn()
            seeds.append(s)
            radii.append(r)
            grads.append((lp - lm) / (2.0 * eps) * kernel(r))
            losses.extend([lp, lm])
        rec = StepRecord(step=step, seeds=seeds, grads=grads,
                         lr=lr_at(step, self.lr, self.total, self.schedule), weight_decay=self.wd,
                         loss=sum(losses) / len(losses), extra={"eps": eps, "radii": radii})
        self.apply(rec)
        return rec
