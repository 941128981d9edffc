"""Perturbed forwards without writing the weights: hooks that swap in θ + ε·z per module.

The exactness contract (docs/architecture.md) says a step may change the weights only by its update. In-place
perturb/restore (θ+εz, −2εz, +εz) rounds differently each time and drifts, so we never write the
weights for a perturbation: a forward pre-hook on each module that owns trainable parameters swaps
in θ + s·ε·z for the duration of that module's forward, built from a small pooled buffer, and puts
the real parameter back afterwards. Embedding tables (large, mostly unused per batch) are not
materialised: only the looked-up rows get their noise, added to the module's output. With low-rank
directions (`directions="lowrank"`, edgezo/lowrank.py) a Linear's weight is not swapped either: a
forward hook adds α·((x·V)·Uᵀ)/√r to its output. Where z comes from is the business of `noise`, the
noise stream (edgezo/noise.py) or the direction kind around it (edgezo/lowrank.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgezo.lowrank import with_directions
from edgezo.noise import Noise, TorchNoise, ZOParam


class ScratchPool:
    """Buffers for perturbed copies. On CUDA they are kept for reuse (the caching allocator would
    keep them anyway); on the CPU each is freed after its module's forward, so at most one
    module's perturbed copy is alive at a time and the step's peak stays at the forward's peak."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        stack = self._free.get(key)
        return stack.pop() if stack else torch.empty_like(like)

    def give(self, t: torch.Tensor) -> None:
        if t.device.type == "cuda":
            self._free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def clear(self) -> None:
        self._free.clear()


class Perturber:
    """Installs the hooks once; `active(seed, alpha)` turns the perturbation on for a forward.

    `directions` ("dense" | "lowrank") and `rank` fix the direction kind for the Perturber's life;
    assigning a stream to `noise` later (resume adopting the logged stream) keeps the kind.
    `lowrank_tables=False` keeps embedding tables on the dense stream, as seed-logs written before
    tables went low-rank did (`use_lowrank_tables`)."""

    def __init__(self, params: list[ZOParam], noise: Noise | None = None, directions: str = "dense",
                 rank: int = 1, lowrank_tables: bool = True):
        self.params = params
        self.directions, self.rank, self.lowrank_tables = directions, rank, lowrank_tables
        self.noise = noise or TorchNoise()
        self.seed: int | None = None
        self.alpha = 0.0
        self.override: Callable[[ZOParam], torch.Tensor | None] | None = None
        self.pool = ScratchPool()
        self._handles: list = []
        self._by_id = {id(p.param): p for p in params}
        owned: dict[nn.Module, list[tuple[str, ZOParam]]] = {}
        for p in params:
            for module, attr in p.owners:
                owned.setdefault(module, []).append((attr, p))
        for module, attrs in owned.items():
            if type(module) is nn.Embedding and module.max_norm is None and [a for a, _ in attrs] == ["weight"]:
                self._handles.append(module.register_forward_hook(self._embedding_hook(attrs[0][1])))
            else:
                self._handles.append(module.register_forward_pre_hook(self._swap_in(attrs)))
                self._handles.append(module.register_forward_hook(self._swap_out(attrs)))

    @property
    def noise(self):
        """What perturbs and updates: the dense noise stream, or the low-rank kind around it."""
        return self._noise

    @noise.setter
    def noise(self, stream) -> None:
        self._noise = with_directions(self.directions, stream, self.params, self.rank, self.lowrank_tables)

    def use_lowrank_tables(self, on: bool) -> None:
        """Whether embedding tables take low-rank directions (a seed-log's header says which)."""
        self.lowrank_tables = on
        self.noise = self._noise

    def _lowrank_of(self, attrs: list[tuple[str, ZOParam]]) -> list[tuple[str, ZOParam]]:
        """Which of a module's parameters take low-rank directions now (its weight, if any)."""
        is_lowrank = getattr(self._noise, "is_lowrank", None)
        return [(a, p) for a, p in attrs if is_lowrank(p)] if is_lowrank else []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.pool.clear()

    @contextmanager
    def active(self, seed: int, alpha: float) -> Iterator[None]:
        self.seed, self.alpha = seed, alpha
        try:
            yield
        finally:
            self.seed, self.alpha = None, 0.0

    @contextmanager
    def inactive(self) -> Iterator[None]:
        """Forwards inside see the real weights, whatever perturbation is active around them."""
        seed, alpha = self.seed, self.alpha
        self.seed, self.alpha = None, 0.0
        try:
            yield
        finally:
            self.seed, self.alpha = seed, alpha

    @contextmanager
    def overridden(self, fn: Callable[[ZOParam], torch.Tensor | None]) -> Iterator[None]:
        """Forwards inside see fn(p) in place of each parameter p it returns a tensor for (DiZO's
        projected weights θ₀ + c·Δθ); the weights themselves are untouched."""
        self.override = fn
        try:
            yield
        finally:
            self.override = None

    def param_for(self, tensor: torch.Tensor) -> ZOParam | None:
        return self._by_id.get(id(tensor))

    def rows(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a (possibly perturbed) table, e.g. the verbalizer rows of a tied lm_head."""
        p = self.param_for(weight)
        if p is not None and self.override is not None:
            t = self.override(p)
            if t is not None:
                return t[ids]
        if self.seed is None or p is None:
            return weight.detach()[ids]
        return self.noise.rows(p, self.seed, self.alpha, ids)

    def full(self, weight: torch.Tensor) -> torch.Tensor:
        """The whole (possibly perturbed) tensor; the caller must not keep it past the forward."""
        p = self.param_for(weight)
        if p is not None and self.override is not None:
            t = self.override(p)
            if t is not None:
                return t
        if self.seed is None or p is None:
            return weight.detach()
        return self.noise.add_into(torch.empty_like(weight), p, self.seed, self.alpha)

    def _embedding_hook(self, p: ZOParam):
        """A plain embedding's output is its table's rows: perturb only the rows looked up."""
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.seed is None or not args:
                return None
            return self.noise.rows(p, self.seed, self.alpha, args[0])

        return hook

    def _swap_in(self, attrs: list[tuple[str, ZOParam]]):
        def hook(mod: nn.Module, args: tuple) -> None:
            if self.seed is not None:
                low = {a for a, _ in self._lowrank_of(attrs)}
                for attr, p in attrs:
                    if attr in low:  # low-rank weights stay in place: _swap_out adds their term
                        continue
                    buf = self.noise.add_into(self.pool.take(p.param), p, self.seed, self.alpha)
                    mod._parameters[attr] = buf  # plain tensor for this forward only
            elif self.override is not None:
                for attr, p in attrs:
                    t = self.override(p)
                    if t is not None:
                        mod._parameters[attr] = t

        return hook

    def _swap_out(self, attrs: list[tuple[str, ZOParam]]):
        def hook(mod: nn.Module, args: tuple, output):
            for attr, p in attrs:
                cur = mod._parameters[attr]
                if cur is not p.param:
                    mod._parameters[attr] = p.param
                    if self.seed is not None:
                        self.pool.give(cur)
            low = self._lowrank_of(attrs) if self.seed is not None and args else []
            for _, p in low:
                output = self.noise.forward_term(p, self.seed, self.alpha, args[0], output)
            return output if low else None

        return hook


def collect_params(model: nn.Module, patterns: list[str] | None) -> list[ZOParam]:
    """Trainable tensors in a fixed order (named_parameters order), with every module that owns each.

    `patterns=None` means all parameters; otherwise a parameter is trainable when any pattern is a
    substring of its name (e.g. q_proj, v_proj).
    """
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, t in module._parameters.items():
            if t is not None:
                owners.setdefault(id(t), []).append((module, attr))
    out: list[ZOParam] = []
    for name, t in model.named_parameters():
        if patterns is not None and not any(pat in name for pat in patterns):
            continue
        out.append(ZOParam(index=len(out), name=name, param=t, owners=owners[id(t)]))
    return out
