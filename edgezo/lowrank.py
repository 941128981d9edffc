"""Direction kinds: which direction parameter p gets at step seed s (`optim.directions`).

* "dense" (the default): z is the noise stream's Gaussian tensor (edgezo/noise.py), as ever.
* "lowrank" (LOZO/SubZero-style): for a 2-D weight W (out × in) of an `nn.Linear`, or a table of an
  `nn.Embedding` (rows × dim, a tied embedding/head table included), z = U·Vᵀ/√r with U (out × r)
  and V (in × r) standard normal, so every entry of z has variance 1 like a dense z (yet a rank-1 z
  has spectral norm ~√(out·in), not ~√out+√in, so it moves a layer's output more and wants a smaller
  lr: about 5× on the tiny test model). U and V come from a torch.Generator on W's device seeded by
  mix(s, p.index, LOWRANK_SALT), a pure function of (seed, parameter) apart from the dense stream's
  mix(s, p.index). Every other trainable tensor (norms, biases, int8 row scales, any 1-D tensor, an
  Embedding or Linear subclass with its own forward such as OPT's learned positions) keeps the dense
  stream, whichever it is (torch or philox: U and V are always drawn with torch generators, on any
  device). Seed-logs written before tables went low-rank (no `lowrank_tables` in their header) replay
  with `tables=False`: tables on the dense stream, as they were written.

A low-rank direction is never materialised for a perturbed forward: the Perturber leaves W in place
and adds α·((x·V)·Uᵀ)/√r to the Linear's output (`forward_term`); an embedding lookup returns the
looked-up rows θ[ids] + α·U[ids]·Vᵀ/√r (`rows`), so a 50k-row table costs r·(rows + dim) random
numbers, not a dense pass over it. The update (the only write a step makes) is
θ ← θ + α/√r · Σ_k u_k v_kᵀ as one fused elementwise pass per rank (addcmul: θ_ij + c·u_i·v_j; no
matmul, so no BLAS summation order to depend on): in place for fp32 θ (one fp32 rounding per rank),
and for fp16/bf16 θ into an fp32 row-chunk copy that is rounded once to θ's dtype. Replay runs the
same function, so it is bit-exact. `rows` and `add_into` (an untied head read through
Perturber.rows/full) run the same elementwise arithmetic, so their rows equal the updated weight's
bit for bit.

Rank 1 is the default: one extra matrix-vector product per Linear in the forward, r·(out+in) random
numbers per weight instead of out·in, and one pass over the weight for the update. LOZO's lazy V
(keep V for ν steps) is not implemented: the noise layer sees step seeds, not step numbers, so it
would need the step threaded through every method and the seed-log.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgezo.noise import Noise, ZOParam, mix

DIRECTIONS = ("dense", "lowrank")
# fp16/bf16 updates go through fp32 row chunks of this size (a function of shape only, so replay
# matches): 4 MiB, larger than the dense stream's since there is no noise to draw per chunk; still well
# under a percent of any forward's peak. fp32 weights are updated whole, in place, with no buffer.
CHUNK_ELEMENTS = 1 << 20
LOWRANK_SALT = 0x10A7_2A4C  # a third mixed part: mix(s, i, SALT) is a different stream from mix(s, i)


def lowrank_eligible(p: ZOParam, tables: bool = True) -> bool:
    """A 2-D weight every owner of which is a plain nn.Linear's `weight` (peft's lora_A/lora_B
    included) or, with `tables`, a plain nn.Embedding's (no max_norm: its lookup is its table's rows),
    so a tied embedding/head table qualifies. A subclass with its own forward does not."""
    def plain(m: nn.Module, attr: str) -> bool:
        if attr != "weight":
            return False
        return type(m) is nn.Linear or (tables and type(m) is nn.Embedding and m.max_norm is None)

    return p.param.dim() == 2 and bool(p.owners) and all(plain(m, a) for m, a in p.owners)


def factors(p: ZOParam, seed: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) for parameter p at step seed `seed`, fp32, stored transposed: U is (r, out), V is (r, in)."""
    out_f, in_f = p.param.shape
    gen = torch.Generator(device=p.param.device)
    gen.manual_seed(mix(seed, p.index, LOWRANK_SALT))
    u = torch.empty((rank, out_f), dtype=torch.float32, device=p.param.device).normal_(generator=gen)
    v = torch.empty((rank, in_f), dtype=torch.float32, device=p.param.device).normal_(generator=gen)
    return u, v


def _add_outer(acc: torch.Tensor, u: torch.Tensor, v: torch.Tensor, c: float,
               src: torch.Tensor | None = None) -> torch.Tensor:
    """acc = (src or acc) + c·Σ_k u[k, :, None]·v[k], fp32, one fused elementwise pass per k
    (addcmul), so any rows of the result equal the same rows computed alone, bit for bit."""
    for k in range(u.shape[0]):
        base = src if (k == 0 and src is not None) else acc
        torch.addcmul(base, u[k].unsqueeze(1), v[k], value=c, out=acc)
    return acc


def add_lowrank_into(out: torch.Tensor, p: ZOParam, seed: int, alpha: float, rank: int,
                     src: torch.Tensor | None = None) -> torch.Tensor:
    """out = src + alpha·U·Vᵀ/√r (src defaults to θ), in fp32; fp16/bf16 are rounded once, per row chunk."""
    src = p.param.detach() if src is None else src
    u, v = factors(p, seed, rank)
    c = alpha / math.sqrt(rank)
    if src.dtype == torch.float32:
        return _add_outer(out, u, v, c, None if out.data_ptr() == src.data_ptr() else src)
    rows_total = src.shape[0]
    step = max(1, CHUNK_ELEMENTS // src.shape[1])
    for r0 in range(0, rows_total, step):
        r1 = min(r0 + step, rows_total)
        block = src[r0:r1].to(torch.float32, copy=True)
        out[r0:r1].copy_(_add_outer(block, u[:, r0:r1], v, c))
    return out


@torch.no_grad()
def lowrank_rows(p: ZOParam, seed: int, alpha: float, rank: int, ids: torch.Tensor) -> torch.Tensor:
    """(θ + alpha·U·Vᵀ/√r)[ids], equal bit for bit to those rows of add_lowrank_into's result."""
    w = p.param.detach()
    flat = ids.reshape(-1)
    u, v = factors(p, seed, rank)
    out = _add_outer(w[flat].to(torch.float32, copy=True), u[:, flat], v, alpha / math.sqrt(rank))
    return out.to(w.dtype).reshape(*ids.shape, w.shape[1])


def forward_term(p: ZOParam, seed: int, alpha: float, rank: int, x: torch.Tensor,
                 output: torch.Tensor) -> torch.Tensor:
    """A Linear's output under W + alpha·U·Vᵀ/√r, from its unperturbed output: + alpha·((x·V)·Uᵀ)/√r.

    fp32 outputs take the term in place (when autograd does not need the output); half-precision ones
    are summed in fp32 and rounded once. W + αz itself is never formed."""
    u, v = factors(p, seed, rank)
    c = alpha / math.sqrt(rank)
    x2 = x.reshape(-1, x.shape[-1])
    xv = (x2 @ v.to(x2.dtype).T).float()  # (N, r): the only extra work that scales with `in`
    o2 = output.reshape(-1, output.shape[-1])
    if output.dtype == torch.float32 and not output.requires_grad and o2.data_ptr() == output.data_ptr():
        o2.addmm_(xv, u, alpha=c)
        return output
    res = torch.addmm(o2.float(), xv, u, alpha=c)
    return res.to(output.dtype).reshape(output.shape)


class LowRankDirections:
    """The "lowrank" kind over a dense noise stream: the same three operations as a stream (add_into,
    rows, update), plus `forward_term` for the Linear weights it gives low-rank directions to.
    `is_lowrank(p)` is the one place that decides which parameters those are."""

    kind = "lowrank"

    def __init__(self, stream: Noise, params: list[ZOParam], rank: int, tables: bool = True):
        if rank < 1:
            raise ValueError(f"optim.rank must be >= 1, got {rank}")
        self.stream, self.rank, self.tables = stream, int(rank), tables
        self._lowrank = {p.index for p in params if lowrank_eligible(p, tables)}

    @property
    def name(self) -> str:  # the dense stream's name: what the seed-log's "noise" key pins
        return self.stream.name

    def is_lowrank(self, p: ZOParam) -> bool:
        return p.index in self._lowrank

    def add_into(self, out: torch.Tensor, p: ZOParam, seed: int, alpha: float) -> torch.Tensor:
        if self.is_lowrank(p):
            return add_lowrank_into(out, p, seed, alpha, self.rank)
        return self.stream.add_into(out, p, seed, alpha)

    def rows(self, p: ZOParam, seed: int, alpha: float, ids: torch.Tensor) -> torch.Tensor:
        if self.is_lowrank(p):
            return lowrank_rows(p, seed, alpha, self.rank, ids)
        return self.stream.rows(p, seed, alpha, ids)

    def forward_term(self, p: ZOParam, seed: int, alpha: float, x: torch.Tensor,
                     output: torch.Tensor) -> torch.Tensor:
        return forward_term(p, seed, alpha, self.rank, x, output)

    @torch.no_grad()
    def update(self, params: list[ZOParam], seed: int, alpha: float) -> None:
        dense = [p for p in params if not self.is_lowrank(p)]
        if dense:
            self.stream.update(dense, seed, alpha)
        for p in params:
            if self.is_lowrank(p):
                add_lowrank_into(p.param.data, p, seed, alpha, self.rank)

    def numbers_per_direction(self, params: list[ZOParam]) -> int:
        """How many random numbers define one direction over `params` (dense: numel; low-rank: r·(out+in))."""
        return sum(self.rank * sum(p.param.shape) if self.is_lowrank(p) else p.param.numel() for p in params)


def with_directions(kind: str, stream: Noise | LowRankDirections, params: list[ZOParam], rank: int = 1,
                    tables: bool = True):
    """The object a Perturber calls `noise`: the stream itself for "dense", else a LowRankDirections
    around it (a LowRankDirections given as `stream` is unwrapped first, so re-wrapping is safe)."""
    if isinstance(stream, LowRankDirections):
        stream = stream.stream
    if kind == "dense":
        return stream
    if kind == "lowrank":
        return LowRankDirections(stream, params, rank, tables)
    raise ValueError(f"optim.directions: unknown kind {kind!r} (known: {', '.join(DIRECTIONS)})")


def direction_kind(noise) -> str:
    return getattr(noise, "kind", "dense")
