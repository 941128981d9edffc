"""The first-order baseline (`method: fo`): AdamW through a backward pass on the trainable set.

It is what a user would otherwise run, put through the same trainer, report and daemon so every
ZO number has a first-order number beside it. It implements the interface the trainer calls on a
ZO method (`step(step, loss_fn) -> StepRecord`), with two differences the trainer asks about:

- `tensor_loss = True`: `loss_fn` must return the differentiable loss tensor (`task.loss(batch)`),
  not the float objective ZO methods compare.
- `replayable = False`: an FO update depends on the gradient, which no scalar in the seed-log can
  redo. Its STEP records (step, loss, lr) are a journal; resume restarts from the newest snapshot,
  which carries the AdamW moments (`state_tensors`) next to the weights, and replay refuses.

Activation checkpointing is on: each decoder layer keeps only its input and is recomputed in the
backward. transformers checkpoints a layer only when that layer is in training mode, and the
engine keeps the model in eval mode, so for the step the checkpointed layers alone (not their
submodules: attention, dropout, peft's adapters) are flagged `training` — the forward computes
exactly what it computes in eval mode (asserted in tests/test_fo.py by counting recomputations).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgezo.models import unwrap
from edgezo.noise import ZOParam
from edgezo.perturb import Perturber
from edgezo.zo import StepRecord, ZOMethod, lr_at

BETAS = (0.9, 0.999)
_SEP = "::"  # state tensor key: "<parameter name>::<AdamW state name>"


class NotReplayable(NotImplementedError):
    pass


def _itself(p: ZOParam) -> torch.Tensor:
    return p.param


class FirstOrder(ZOMethod):
    name = "fo"
    tensor_loss = True
    replayable = False

    def __init__(self, params: list[ZOParam], perturber: Perturber, model: nn.Module, *, lr: float,
                 weight_decay: float = 0.0, schedule: str = "constant", total_steps: int = 0,
                 checkpointing: bool = True, **_ignored):
        super().__init__(params, perturber, lr=lr, eps=0.0, weight_decay=weight_decay, schedule=schedule,
                         total_steps=total_steps)
        self.model = model
        for p in params:  # the loader froze everything; only the trainable set takes gradients
            p.param.requires_grad_(True)
        # Decay on matrices only, as MeZO does: norms, biases and scales are left alone.
        decay = [p.param for p in params if p.param.dim() >= 2]
        other = [p.param for p in params if p.param.dim() < 2]
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0})
                  if g["params"]]
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=BETAS)
        self.layers = self._enable_checkpointing() if checkpointing else []

    def _enable_checkpointing(self) -> list[nn.Module]:
        base = unwrap(self.model)
        if not getattr(base, "supports_gradient_checkpointing", False):
            warnings.warn(f"{type(base).__name__} does not support activation checkpointing; method fo keeps "
                          "every layer's activations for the backward", stacklevel=3)
            return []
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.x; older: gradient_...
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]

    @contextmanager
    def _backward_mode(self) -> Iterator[None]:
        """Checkpointed layers flagged as training (nothing below them), no KV cache, the trainable
        tensors themselves in the forward (the perturber would hand out detached verbalizer rows)."""
        cfg = getattr(unwrap(self.model), "config", None)
        use_cache = getattr(cfg, "use_cache", None)
        was = [m.training for m in self.layers]
        for m in self.layers:
            m.training = True  # only the flag transformers' checkpointing tests; children stay in eval
        if cfg is not None:
            cfg.use_cache = False  # a cache would be appended to again by the recompute
        try:
            with torch.enable_grad(), self.perturber.overridden(_itself):
                yield
        finally:
            for m, t in zip(self.layers, was):
                m.training = t
            if cfg is not None:
                cfg.use_cache = use_cache

    def step(self, step: int, loss_fn: Callable[[], torch.Tensor]) -> StepRecord:
        lr = lr_at(step, self.lr, self.total, self.schedule)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        with self._backward_mode():
            loss = loss_fn()
            value = float(loss.detach())
            if math.isfinite(value):
                loss.backward()
        del loss
        if math.isfinite(value):  # a non-finite loss leaves the weights as they were; the trainer stops
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # gradients live only inside the step
        return StepRecord(step=step, seeds=[], grads=[], lr=lr, weight_decay=self.wd, loss=value)

    def apply(self, rec: StepRecord) -> None:
        raise NotReplayable(f"step {rec.step} of a method: fo run cannot be redone from the seed-log (an FO update "
                            "needs its gradient); restore a snapshot instead")

    # --- optimizer state, saved with every snapshot so resume continues exactly -------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for p in self.params:
            for key, value in self.opt.state.get(p.param, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                out[f"{p.name}{_SEP}{key}"] = t.detach().cpu().contiguous()
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        by_name: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            name, _, what = key.rpartition(_SEP)
            by_name.setdefault(name, {})[what] = t
        self.opt.state.clear()
        for p in self.params:
            st = by_name.get(p.name)
            if st:  # AdamW keeps `step` on the CPU (not capturable), the moments beside the parameter
                self.opt.state[p.param] = {k: (v if k == "step" else v.to(p.param.device)) for k, v in st.items()}
