"""Seeded Gaussian directions, applied on the fly inside the forward pass.

The exactness contract (DESIGN.md) says a step may change the weights only by its update. In-place
perturb/restore (θ+εz, −2εz, +εz) rounds differently each time and drifts, so we never write the
weights for a perturbation: a forward pre-hook on each module that owns trainable parameters swaps
in θ + s·ε·z for the duration of that module's forward, built from a small pooled buffer, and puts
the real parameter back afterwards. Embedding tables (large, mostly unused per batch) are not
materialised: only the looked-up rows get their noise, added to the module's output.

Noise for parameter i at seed s comes from its own generator seeded with mix(s, i), drawn row-chunk
by row-chunk, so any parameter's z can be regenerated alone, in any order, on any pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 18  # noise is drawn in row chunks of about this many elements (1 MiB fp32)
_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """A 63-bit seed from several integers (torch generators take signed 64-bit seeds)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = splitmix64(h ^ (p & _MASK64))
    return h & ((1 << 63) - 1)


@dataclass
class ZOParam:
    """A trainable tensor, where it lives, and its fixed index in the noise stream."""

    index: int
    name: str
    param: torch.Tensor
    owners: list[tuple[nn.Module, str]]  # (module, attribute) pairs; tied weights have several


def row_chunks(param: torch.Tensor) -> int:
    """Rows per noise chunk for this tensor (a function of shape only, so replay matches)."""
    if param.dim() < 2:
        return max(1, param.numel())
    row = param[0].numel()
    return max(1, CHUNK_ELEMENTS // row)


def noise_chunks(p: ZOParam, seed: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (row_start, row_end, z) in fp32 for parameter p at step seed `seed`.

    The buffer is reused between yields: consume each chunk before asking for the next.
    """
    t = p.param
    gen = torch.Generator(device=t.device)
    gen.manual_seed(mix(seed, p.index))
    if t.dim() == 0:
        z = torch.empty((), dtype=torch.float32, device=t.device)
        z.normal_(generator=gen)
        yield 0, 1, z
        return
    rows_total = t.shape[0]
    step = row_chunks(t)
    buf = torch.empty((min(step, rows_total), *t.shape[1:]), dtype=torch.float32, device=t.device)
    for r0 in range(0, rows_total, step):
        r1 = min(r0 + step, rows_total)
        z = buf[: r1 - r0]
        z.normal_(generator=gen)
        yield r0, r1, z


def add_noise_into(out: torch.Tensor, p: ZOParam, seed: int, alpha: float,
                   src: torch.Tensor | None = None) -> torch.Tensor:
    """out = src + alpha·z (src defaults to θ), computed in fp32 and rounded once to θ's dtype."""
    src = p.param.detach() if src is None else src
    in_place_fp32 = out.data_ptr() == src.data_ptr() and src.dtype == torch.float32
    for r0, r1, z in noise_chunks(p, seed):
        if src.dim() == 0:
            out.copy_(src.float() + alpha * z)
        elif in_place_fp32:
            out[r0:r1].add_(z, alpha=alpha)
        elif src.dtype == torch.float32:  # same kernel as add_, one pass
            torch.add(src[r0:r1], z, alpha=alpha, out=out[r0:r1])
        else:
            block = src[r0:r1].to(torch.float32, copy=True)
            block.add_(z, alpha=alpha)
            out[r0:r1].copy_(block)
    return out


@torch.no_grad()
def apply_update(p: ZOParam, seed: int, alpha: float) -> None:
    """θ ← θ + alpha·z in place (the only write a step makes), one fp32 round per element."""
    add_noise_into(p.param.data, p, seed, alpha)


@torch.no_grad()
def perturbed_rows(p: ZOParam, seed: int, alpha: float, ids: torch.Tensor) -> torch.Tensor:
    """(θ + alpha·z)[ids] for a 2-D table without materialising the whole perturbed table."""
    w = p.param.detach()
    out = w[ids].float()
    flat_ids = ids.reshape(-1)
    flat_out = out.reshape(-1, w.shape[1])
    for r0, r1, z in noise_chunks(p, seed):
        sel = ((flat_ids >= r0) & (flat_ids < r1)).nonzero(as_tuple=True)[0]
        if sel.numel():
            flat_out[sel] += alpha * z[flat_ids[sel] - r0]
    return out.to(w.dtype)


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
    """Installs the hooks once; `active(seed, alpha)` turns the perturbation on for a forward."""

    def __init__(self, params: list[ZOParam]):
        self.params = params
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
            if type(module) is nn.Embedding and [a for a, _ in attrs] == ["weight"]:
                self._handles.append(module.register_forward_hook(self._embedding_hook(attrs[0][1])))
            else:
                self._handles.append(module.register_forward_pre_hook(self._swap_in(module, attrs)))
                self._handles.append(module.register_forward_hook(self._swap_out(module, attrs)))

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
        return perturbed_rows(p, self.seed, self.alpha, ids)

    def full(self, weight: torch.Tensor) -> torch.Tensor:
        """The whole (possibly perturbed) tensor; the caller must not keep it past the forward."""
        p = self.param_for(weight)
        if p is not None and self.override is not None:
            t = self.override(p)
            if t is not None:
                return t
        if self.seed is None or p is None:
            return weight.detach()
        return add_noise_into(torch.empty_like(weight), p, self.seed, self.alpha)

    def _embedding_hook(self, p: ZOParam):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.seed is None:
                return None
            ids = args[0] if args else None
            if ids is None:
                return None
            w = p.param.detach()
            flat_ids = ids.reshape(-1)
            noise = torch.zeros((flat_ids.numel(), w.shape[1]), dtype=torch.float32, device=w.device)
            for r0, r1, z in noise_chunks(p, self.seed):
                sel = ((flat_ids >= r0) & (flat_ids < r1)).nonzero(as_tuple=True)[0]
                if sel.numel():
                    noise[sel] = z[flat_ids[sel] - r0]
            base = output.reshape(-1, w.shape[1]).float()
            return base.add_(noise, alpha=self.alpha).to(output.dtype).reshape(output.shape)

        return hook

    def _swap_in(self, module: nn.Module, attrs: list[tuple[str, ZOParam]]):
        def hook(mod: nn.Module, args: tuple) -> None:
            if self.seed is not None:
                for attr, p in attrs:
                    buf = add_noise_into(self.pool.take(p.param), p, self.seed, self.alpha)
                    mod._parameters[attr] = buf  # plain tensor for this forward only
            elif self.override is not None:
                for attr, p in attrs:
                    t = self.override(p)
                    if t is not None:
                        mod._parameters[attr] = t

        return hook

    def _swap_out(self, module: nn.Module, attrs: list[tuple[str, ZOParam]]):
        def hook(mod: nn.Module, args: tuple, output) -> None:
            for attr, p in attrs:
                cur = mod._parameters[attr]
                if cur is not p.param:
                    mod._parameters[attr] = p.param
                    if self.seed is not None:
                        self.pool.give(cur)

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
