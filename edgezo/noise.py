"""Noise streams: the seeded Gaussian directions z that MeZO and DiZO perturb and update along.

Noise for parameter i at seed s comes from its own stream keyed by mix(s, i), so any parameter's z
can be regenerated alone, in any order, on any pass. Two streams exist (a job keeps one for life; the
seed-log header names it):

* "torch": a torch.Generator per parameter, drawn row-chunk by row-chunk (every device; the CPU
  default).
* "philox": counter-based normals generated inside fused Triton kernels (CUDA;
  edgezo/triton_noise.py), which also gives any subset of elements without the rest.

Every stream offers the same three operations: `add_into` (θ + α·z into a buffer, for a perturbed
forward), `rows` (the same for a few rows of a table) and `update` (θ ← θ + α·z in place over a
group of tensors, the only write a step makes). Each rounds once, from fp32, to θ's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
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


Noise = TorchNoise | PhiloxNoise
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


def make_noise(name: str, device: torch.device) -> Noise:
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

