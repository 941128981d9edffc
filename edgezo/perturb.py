"""Seeded Gaussian directions, applied on the fly inside the forward pass.

The exactness contract (DESIGN.md) says a step may change the weights only by its update. In-place
perturb/restore (θ+εz, −2εz, +εz) rounds differently each time and drifts, so we never write the
weights for a perturbation: a forward pre-hook on each module that owns trainable parameters swaps
in θ + s·ε·z for the duration of that module's forward, built from a small pooled buffer, and puts
the real parameter back afterwards. Embedding tables (large, mostly unused per batch) are not
materialised: only the looked-up rows get their noise, added to the module's output.

Noise for parameter i at seed s comes from its own stream keyed by mix(s, i), so any parameter's z
can be regenerated alone, in any order, on any pass. Two streams exist (a job keeps one for life; the
seed-log header names it): "torch", a torch.Generator per parameter drawn row-chunk by row-chunk
(every device, the CPU default), and "philox", counter-based normals generated inside fused Triton
kernels (CUDA; edgezo/triton_noise.py), which also gives any subset of elements without the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

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
    """(θ + alpha·z)[ids] for a 2-D table without materialising the whole perturbed table.

    Same arithmetic as add_noise_into (one fused add in fp32, one rounding), so a row looked up here
    equals that row of the materialised perturbed table bit for bit. Chunks past the largest id are
    never drawn."""
    w = p.param.detach()
    flat_ids = ids.reshape(-1)
    noise = torch.empty((flat_ids.numel(), w.shape[1]), dtype=torch.float32, device=w.device)
    last = int(flat_ids.max()) if flat_ids.numel() else -1
    for r0, r1, z in noise_chunks(p, seed):
        if r0 > last:
            break
        sel = ((flat_ids >= r0) & (flat_ids < r1)).nonzero(as_tuple=True)[0]
        if sel.numel():
            noise[sel] = z[flat_ids[sel] - r0]
    out = w[flat_ids].float().add_(noise, alpha=alpha)
    return out.to(w.dtype).reshape(*ids.shape, w.shape[1])


class TorchNoise:
    """The "torch" stream: per-parameter torch.Generator, chunked (the functions above)."""

    name = "torch"

    def add_into(self, out: torch.Tensor, p: ZOParam, seed: int, alpha: float) -> torch.Tensor:
        return add_noise_into(out, p, seed, alpha)

    def rows(self, p: ZOParam, seed: int, alpha: float, ids: torch.Tensor) -> torch.Tensor:
        return perturbed_rows(p, seed, alpha, ids)

    @torch.no_grad()
    def update(self, params: list[ZOParam], seed: int, alpha: float) -> None:
        for p in params:
            apply_update(p, seed, alpha)


class PhiloxNoise:
    """The "philox" stream: counter-based normals inside fused Triton kernels; a group update is one
    launch per dtype instead of one per tensor."""

    name = "philox"

    def __init__(self) -> None:
        from edgezo import triton_noise

        self.k = triton_noise

    def add_into(self, out: torch.Tensor, p: ZOParam, seed: int, alpha: float) -> torch.Tensor:
        return self.k.add_noise_(out, p.param.detach(), mix(seed, p.index), alpha)

    def rows(self, p: ZOParam, seed: int, alpha: float, ids: torch.Tensor) -> torch.Tensor:
        return self.k.rows(p.param.detach(), ids, mix(seed, p.index), alpha)

    @torch.no_grad()
    def update(self, params: list[ZOParam], seed: int, alpha: float) -> None:
        ts = [p.param.data for p in params]
        self.k.add_noise_group_(ts, ts, [mix(seed, p.index) for p in params], [alpha] * len(ts))


NOISE_STREAMS = ("torch", "philox")


class NoiseUnavailable(RuntimeError):
    pass


def philox_available(device: torch.device) -> str | None:
    """None when the philox stream can run on `device`, else why not."""
    try:
        from edgezo import triton_noise
    except ImportError as e:  # pragma: no cover - the module itself imports triton lazily
        return str(e)
    if not triton_noise.available(device):
        if device.type == "cuda":
            return "Triton is not installed (pip install triton)"
        return "it runs on CUDA devices (or on the CPU only under TRITON_INTERPRET=1, for testing)"
    return _philox_smoke(str(device))


@cache
def _philox_smoke(device: str) -> str | None:
    """Compile and run the kernel once on a few elements: a GPU Triton cannot target (or a broken
    install) shows up here, at job start, instead of in the middle of a step."""
    from edgezo import triton_noise

    try:
        t = torch.zeros(8, device=device)
        triton_noise.add_noise_(t, t, 1, 1.0)
        if not bool(torch.isfinite(t).all()) or not bool(t.ne(0).any()):
            return "its smoke test produced no noise"
    except Exception as e:  # compiler/driver errors have many types; any of them means "not here"
        return f"Triton failed on this device ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def make_noise(name: str, device: torch.device) -> TorchNoise | PhiloxNoise:
    """The stream called `name` ("auto": philox where Triton can run it on `device`, else torch)."""
    if name == "auto":
        name = "philox" if device.type == "cuda" and philox_available(device) is None else "torch"
    if name == "torch":
        return TorchNoise()
    if name == "philox":
        why = philox_available(device)
        if why is not None:
            raise NoiseUnavailable(f"the philox noise stream cannot run on {device.type}: {why}")
        return PhiloxNoise()
    raise NoiseUnavailable(f"unknown noise stream {name!r} (known: {', '.join(NOISE_STREAMS)})")


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

    def __init__(self, params: list[ZOParam], noise: TorchNoise | PhiloxNoise | None = None):
        self.params = params
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

    def _swap_in(self, module: nn.Module, attrs: list[tuple[str, ZOParam]]):
        def hook(mod: nn.Module, args: tuple) -> None:
            if self.seed is not None:
                for attr, p in attrs:
                    buf = self.noise.add_into(self.pool.take(p.param), p, self.seed, self.alpha)
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
