"""HiZOO: MeZO preconditioned by a diagonal Hessian estimate (after Zhao et al., 2024).

Each trainable tensor gets a diagonal curvature estimate H (one fp32 value per element, ones at the
start). Directions are u = H^(-1/2) ⊙ z, so flat coordinates are explored further and steep ones
less. A step spends three losses: L₀ = L(θ), L± = L(θ ± ε·u). The three-point curvature along u,
c = |L₊ + L₋ − 2L₀| / 2ε², updates H the way HiZOO does:

    H ← (1 − α)·H + α·c·H ⊙ z²          (α = hizoo.smooth)

and the update follows the preconditioned estimate with the refreshed H (HiZOO's Algorithm 1):

    θ ← θ − lr·(L₊ − L₋)/2ε · H^(-1/2) ⊙ z

H stays in fp32 whatever the weights' dtype: reference implementations keep it in the weight dtype,
where α·c·H·z² (α is ~1e-6 or less) underflows in fp16/bf16 and H never moves. Its memory is one
fp32 value per trainable element (`state_bytes`), so HiZOO suits LoRA, topK and other small
trainable sets; on `trainable: full` it doubles an fp32 model's weights.

Replay and resume: the record is MeZO's plus the curvature c of each direction (`extra["curv"]`);
`apply` redoes the H update from c and the regenerated z, then the weight update, so replaying the
log rebuilds H and θ bit for bit. Snapshots carry H (`state_tensors`). Low-rank directions are
refused at spec time: H^(-1/2) ⊙ U·Vᵀ is no longer low rank, so the forward-side trick cannot apply it.
"""

from __future__ import annotations

import torch

from edgezo.noise import ZOParam
from edgezo.perturb import Perturber
from edgezo.zo import LossFn, MeZO, StepRecord, lr_at


class Preconditioned:
    """A noise stream whose directions are H^(-1/2) ⊙ z: what the Perturber perturbs with (and what
    the update moves along) while HiZOO drives it. z comes from the wrapped stream (torch or philox),
    so the seeds mean what they mean for MeZO; every write is computed in fp32 and rounded once."""

    def __init__(self, stream, hess: dict[int, torch.Tensor]):
        self.stream, self.hess = stream, hess

    @property
    def name(self) -> str:  # the seed-log header pins the underlying stream
        return self.stream.name

    def z(self, p: ZOParam, seed: int) -> torch.Tensor:
        """The plain Gaussian z of p at `seed`, fp32 (the wrapped stream adding 1·z onto zeros)."""
        buf = torch.zeros(p.param.shape, dtype=torch.float32, device=p.param.device)
        return self.stream.add_into(buf, ZOParam(p.index, p.name, buf, []), seed, 1.0)

    def direction(self, p: ZOParam, seed: int) -> torch.Tensor:
        """u = H^(-1/2) ⊙ z in fp32."""
        return self.z(p, seed).mul_(torch.rsqrt(self.hess[p.index]))

    def add_into(self, out: torch.Tensor, p: ZOParam, seed: int, alpha: float) -> torch.Tensor:
        src, u = p.param.detach(), self.direction(p, seed)
        if src.dtype == torch.float32:
            torch.add(src, u, alpha=alpha, out=out)
        else:
            out.copy_(src.float().add_(u, alpha=alpha))
        return out

    def rows(self, p: ZOParam, seed: int, alpha: float, ids: torch.Tensor) -> torch.Tensor:
        w, flat = p.param.detach(), ids.reshape(-1)
        u = self.direction(p, seed)[flat]
        return w[flat].float().add_(u, alpha=alpha).to(w.dtype).reshape(*ids.shape, w.shape[1])

    @torch.no_grad()
    def update(self, params: list[ZOParam], seed: int, alpha: float) -> None:
        for p in params:
            self.add_into(p.param.data, p, seed, alpha)


class HiZOO(MeZO):
    name = "hizoo"

    def __init__(self, params: list[ZOParam], perturber: Perturber, *, smooth: float, **common):
        if perturber.directions != "dense":
            raise ValueError("method: hizoo scales each element of z by H^(-1/2), which a low-rank direction "
                             "cannot carry; use optim.directions: dense")
        super().__init__(params, perturber, **common)
        self.smooth = smooth
        self.hess: dict[int, torch.Tensor] = {}
        self.reset_state()

    def reset_state(self) -> None:
        """H = 1 everywhere (the start of a run, or of a replay from the base weights)."""
        self.hess = {p.index: torch.ones(p.param.shape, dtype=torch.float32, device=p.param.device)
                     for p in self.params}

    def state_bytes(self) -> int:
        """What HiZOO keeps beyond MeZO: H, one fp32 value per trainable element."""
        return sum(h.numel() * h.element_size() for h in self.hess.values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"hess.{p.name}": self.hess[p.index].detach().cpu().contiguous() for p in self.params}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for p in self.params:
            self.hess[p.index].copy_(state[f"hess.{p.name}"])

    def _noise(self) -> Preconditioned:
        """Wrap whatever stream the Perturber has now (resume may have swapped in the logged one)."""
        noise = self.perturber.noise
        if not isinstance(noise, Preconditioned) or noise.hess is not self.hess:
            base = noise.stream if isinstance(noise, Preconditioned) else noise
            noise = Preconditioned(base, self.hess)
            self.perturber.noise = noise  # dense: the Perturber keeps it as it is
        return noise

    @torch.no_grad()
    def step(self, step: int, loss_fn: LossFn) -> StepRecord:
        self._noise()
        base = getattr(loss_fn, "base", None)
        l0 = base() if base is not None else loss_fn()
        seeds, grads, curv, losses = [], [], [], []
        for k in range(self.q):
            s, lp, lm = self.two_point(step, k, loss_fn)  # along H^(-1/2)·z: the Perturber's stream is wrapped
            seeds.append(s)
            grads.append((lp - lm) / (2.0 * self.eps))
            curv.append(abs(lp + lm - 2.0 * l0) / (2.0 * self.eps * self.eps))
            losses.extend([lp, lm])
        rec = StepRecord(step=step, seeds=seeds, grads=grads,
                         lr=lr_at(step, self.lr, self.total, self.schedule), weight_decay=self.wd,
                         loss=l0, extra={"curv": curv})
        self.apply(rec)
        return rec

    @torch.no_grad()
    def apply(self, rec: StepRecord) -> None:
        """H from each direction's curvature, in order; then MeZO's update along H^(-1/2) ⊙ z."""
        noise = self._noise()
        a = self.smooth
        for s, c in zip(rec.seeds, rec.extra["curv"]):
            if a == 0.0 or c == 0.0:
                continue
            for p in self.params:
                h = self.hess[p.index]
                h.mul_(noise.z(p, s).square_().mul_(a * c).add_(1.0 - a))  # (1−α)H + α·c·H·z²
        super().apply(rec)
