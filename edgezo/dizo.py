"""DiZO: divergence-driven layer adaptation on top of MeZO (Tan et al., 2025, Algorithm 1).

Every `interval` steps the projected layers (query/value projections by default) are rescaled
around the pre-trained weights: θ ← θ₀ + (γ/‖Δθ‖)·Δθ with Δθ = θ − θ₀, one γ per layer. γ is
learnt on the step's batch either with a few ZO iterations (two forwards each) or, in the heavy
"projection" phase, with Adam through a backward pass (the paper's DiZO w. FO).

We learn the ratio r = γ/‖Δθ‖ directly. That is the paper's re-initialisation (r starts at 1 each
phase) and clipping (r ∈ [1−τ, 1+τ]) with ε' and the step size acting on the ratio, so neither
depends on the scale of ‖Δθ‖ (which is ~1e-3 early in a MeZO run and would be swamped by ε' = 0.1).
γ and ‖Δθ‖ are written to the seed-log so replay applies the same projection bit-for-bit.

θ₀ is needed only here, so it never stays on the accelerator: it is read one layer at a time from
the base model's safetensors file (memory-mapped), or from a CPU copy when there is no such file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgezo.noise import ZOParam, mix
from edgezo.perturb import Perturber
from edgezo.scales import SCALE_ATTR
from edgezo.zo import MeZO, StepRecord


class Theta0:
    """Pre-trained weights of the projected layers, streamed to the device one layer at a time."""

    def __init__(self, model_path: Path, params: list[ZOParam]):
        self.source: dict[str, tuple[Path, str] | torch.Tensor] = {}
        files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
        keys: dict[str, Path] = {}
        if files:
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        keys[k] = f
        for p in params:
            f = keys.get(p.name)
            if f is not None and torch.equal(self._read(f, p.name, p.param), p.param.detach()):
                self.source[p.name] = (f, p.name)
            else:  # GGUF or renamed weights: keep a host copy (pinned when the model is on CUDA)
                host = p.param.detach().to("cpu", copy=True)
                self.source[p.name] = host.pin_memory() if p.param.is_cuda else host

    @staticmethod
    def _read(f: Path, key: str, like: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt", device="cpu") as h:
            t = h.get_tensor(key)
        return t.to(device=like.device, dtype=like.dtype)

    def get(self, p: ZOParam) -> torch.Tensor:
        src = self.source[p.name]
        if isinstance(src, torch.Tensor):
            return src.to(p.param.device, non_blocking=True)
        return self._read(src[0], src[1], p.param)

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.source.values() if isinstance(t, torch.Tensor))

    def mode(self) -> str:
        return "mmap" if all(not isinstance(t, torch.Tensor) for t in self.source.values()) else "host-copy"


def projected(theta: torch.Tensor, theta0: torch.Tensor, ratio) -> torch.Tensor:
    """θ₀ + r·(θ − θ₀) in fp32, rounded once. `ratio` may be a float or a 0-d tensor with grad."""
    t0 = theta0.float()
    return (t0 + ratio * (theta.detach().float() - t0)).to(theta.dtype)


@dataclass
class ProjectionRecord:
    step: int
    layers: list[tuple[int, float, float]]  # (param index, γ, ‖Δθ‖)
    mode: str  # "zo" | "fo"
    loss_before: float = float("nan")
    loss_after: float = float("nan")


class DiZO(MeZO):
    name = "dizo"

    def __init__(self, params: list[ZOParam], perturber: Perturber, *, dizo: dict, model_path: Path,
                 model: nn.Module, **kw):
        super().__init__(params, perturber, **kw)
        self.cfg = dizo
        self.model = model
        self.layers = [p for p in params if any(pat in p.name for pat in dizo["layers"])
                       and (p.param.dim() >= 2 or p.name.endswith(SCALE_ATTR))]  # a layer's weights or its int8 scales
        if not self.layers:
            raise ValueError(f"dizo.layers: no trainable 2-D parameter (or int8 scales) matches {dizo['layers']}")
        for p in self.layers:
            if any(isinstance(m, nn.Embedding) for m, _ in p.owners):
                raise ValueError(f"dizo.layers: {p.name} is an embedding table; project attention weights instead")
        self.theta0 = Theta0(model_path, self.layers)

    def projection_due(self, step: int) -> bool:
        """After step t, when t+1 is a multiple of the interval."""
        return (step + 1) % self.cfg["interval"] == 0

    @property
    def heavy(self) -> bool:
        """Only first-order projection learning needs a memory lease (activations for backward)."""
        return self.cfg["projection"] == "fo"

    @torch.no_grad()
    def _norms(self) -> list[float]:
        out = []
        for p in self.layers:
            d = p.param.detach().float() - self.theta0.get(p).float()
            out.append(float(torch.linalg.vector_norm(d)))
        return out

    def _override(self, ratios) -> Callable[[ZOParam], torch.Tensor | None]:
        by_index = {p.index: i for i, p in enumerate(self.layers)}

        def fn(p: ZOParam) -> torch.Tensor | None:
            i = by_index.get(p.index)
            if i is None:
                return None
            return projected(p.param, self.theta0.get(p), ratios[i])

        return fn

    def project(self, step: int, loss_fn: Callable[[], float], loss_tensor_fn: Callable[[], torch.Tensor],
                ) -> ProjectionRecord:
        norms = self._norms()
        tau = self.cfg["clip"]
        live = [n > 0.0 for n in norms]
        if self.cfg["projection"] == "fo":
            ratios = self._learn_fo(loss_tensor_fn, tau)
        else:
            ratios = self._learn_zo(step, loss_fn, tau)
        ratios = [min(max(r, 1.0 - tau), 1.0 + tau) if ok else 1.0 for r, ok in zip(ratios, live)]
        rec = ProjectionRecord(step=step, mode=self.cfg["projection"],
                               layers=[(p.index, r * n, n) for p, r, n in zip(self.layers, ratios, norms)])
        self.apply_projection(rec)
        return rec

    @torch.no_grad()
    def _learn_zo(self, step: int, loss_fn: Callable[[], float], tau: float) -> list[float]:
        n = len(self.layers)
        r = torch.ones(n, dtype=torch.float64)
        eps, lr = self.cfg["eps"], self.cfg["lr"]
        for j in range(self.cfg["iters"]):
            gen = torch.Generator().manual_seed(mix(self.seed, step, 0xD120, j))
            u = torch.randn(n, generator=gen, dtype=torch.float64)
            with self.perturber.overridden(self._override((r + eps * u).tolist())):
                lp = loss_fn()
            with self.perturber.overridden(self._override((r - eps * u).tolist())):
                lm = loss_fn()
            g = (lp - lm) / (2 * eps)
            r = torch.clamp(r - lr * g * u, 1 - tau, 1 + tau)
        return r.tolist()

    def _learn_fo(self, loss_tensor_fn: Callable[[], torch.Tensor], tau: float) -> list[float]:
        device = self.layers[0].param.device
        r = torch.ones(len(self.layers), dtype=torch.float32, device=device, requires_grad=True)
        opt = torch.optim.Adam([r], lr=self.cfg["fo_lr"])
        ckpt = self.cfg.get("checkpointing", False)
        if ckpt:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()
        try:
            with torch.enable_grad():
                for _ in range(self.cfg["iters"]):
                    opt.zero_grad(set_to_none=True)
                    with self.perturber.overridden(self._override(r)):
                        loss = loss_tensor_fn()
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        r.clamp_(1 - tau, 1 + tau)
                    del loss
            return r.detach().double().cpu().tolist()
        finally:
            if ckpt:
                self.model.gradient_checkpointing_disable()
                self.model.eval()
            del opt, r
            if device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def apply_projection(self, rec: ProjectionRecord) -> None:
        """θ ← θ₀ + (γ/‖Δθ‖)·Δθ per layer, from logged γ and ‖Δθ‖ (so replay needs no forward)."""
        by_index = {p.index: p for p in self.layers}
        for index, gamma, norm in rec.layers:
            if norm <= 0.0 or gamma == norm:  # ratio 1: the identity, leave the weights bit-identical
                continue
            p = by_index[index]
            p.param.copy_(projected(p.param, self.theta0.get(p), gamma / norm))


def projection_frame(rec: ProjectionRecord) -> dict:
    return {"step": rec.step, "mode": rec.mode, "layers": [list(x) for x in rec.layers],
            "loss_before": rec.loss_before, "loss_after": rec.loss_after}


def projection_from_frame(d: dict) -> ProjectionRecord:
    return ProjectionRecord(step=d["step"], mode=d["mode"], layers=[tuple(x) for x in d["layers"]])


__all__ = ["DiZO", "ProjectionRecord", "Theta0", "StepRecord", "projected"]
