"""Counter-based Gaussian noise ("philox" stream) with fused Triton kernels, plus a pure-torch reference.

Why: the "torch" stream of `edgezo.noise` (a torch.Generator per parameter) is sequential, so a
perturbed copy needs a noise buffer and a second pass, and a few rows of a table need the whole
table's noise drawn before them.
Here each element's noise is a pure function of (key, element index), so one fused kernel reads θ,
adds α·z and writes the result (no noise tensor), and any subset of elements (e.g. the looked-up rows
of an embedding) is generated alone, bit-identical to the same elements of the full tensor.
Long because the stream is a file-format contract: the kernels and their pure-torch reference sit
side by side so that one can be checked against the other.

The stream (a file-format-level contract: a seed log written with it replays only with it)
------------------------------------------------------------------------------------------
For parameter index i at step seed s, the key is k = edgezo.noise.mix(s, i), a 63-bit integer; the
functions here take k itself. Element e of the tensor (flat, contiguous row-major order, e ≥ 0) gets

    q = e // 4 (its quad), lane = e % 4
    x0, x1, x2, x3 = Philox4x32-10(counter = (q mod 2³², q >> 32, 0, 0),
                                   key     = (k mod 2³², k >> 32))
        (Random123 / triton constants: multipliers 0xD2511F53, 0xCD9E8D57, key bumps 0x9E3779B9,
         0xBB67AE85; ten rounds, round: c0' = hi(B·c2) ^ c1 ^ k0, c2' = hi(A·c0) ^ c3 ^ k1,
         c1' = lo(B·c2), c3' = lo(A·c0), then k0 += 0x9E3779B9, k1 += 0xBB67AE85, all mod 2³²)
    v_j = x_j if x_j < 2³¹ else 2³² − 1 − x_j                      (int32 x, ~x when negative)
    u_j = fl32(fl32(v_j) · fl32(4.6566127342e-10))                  in [0, 1)
    Box-Muller on (u0, u1) and (u2, u3), all in fp32:
        r = sqrt_rn(−2·log(max(u_a, 1e-7))), θ = fl32(6.283185307179586)·u_b
        z[4q + 0] = r·cos θ, z[4q + 1] = r·sin θ           (a, b = 0, 1)
        z[4q + 2] = r·cos θ, z[4q + 3] = r·sin θ           (a, b = 2, 3)

This is lane (e % 4) of `tl.randn4x(k, e // 4)` in triton 3.x (triton.language.random: same Philox,
same int→uniform conversion, same Box-Muller), except that sqrt here is correctly rounded (tl.sqrt_rn,
where tl.randn4x gets sqrt.approx on CUDA). The kernels spell the stream out instead of calling
tl.randn4x, so a triton upgrade cannot change it; the tests check the integers against the Random123
known-answer vectors and against tl.randint4x. One Philox call gives four normals, so the kernels run
one Philox per four elements and interleave the lanes for contiguous stores. |z| < 5.68 always.

Exactness across backends: everything up to u_j, and sqrt, is integer or correctly rounded fp32
arithmetic, identical on every backend; log/sin/cos are each backend's fp32 implementations (numpy's
under the interpreter, libdevice's on CUDA, torch's in `reference_noise`), so z can differ in the last
bits between backends. Observed, interpreter vs. `reference_noise` on x86-64: max |difference| =
7.2e-7 (at most a few ulp of z) over ~5·10⁵ samples, with about 32 % of elements differing in a last
bit or two. `REFERENCE_ATOL` = 1e-5 is the bound the tests hold every backend to (the CUDA figure has
not been measured yet: libdevice logf/sinf/cosf are within 1-2 ulp, so it should be of the same
order). Within one backend the stream is bit-exact: the same (k, e) gives the same bits in every
kernel here (add_noise_, add_noise_group_, rows, noise), whatever the block layout. A seed log replays
bit-exactly only on the backend (and triton/CUDA math library) that wrote it.

The update: out = round_to(out.dtype)(fl32(fl32(src) + fl32(α₃₂ · z))) with α₃₂ = fp32(α), computed
without FMA contraction (launched with enable_fp_fusion=False) and rounded once to the storage dtype
(round-to-nearest-even), i.e. exactly `(src.float() + torch.tensor(α, dtype=float32) * z).to(dtype)`.
bf16 is widened and rounded in integer arithmetic inside the kernels (NaN becomes 0x7FC0), which is
bit-exact everywhere; the triton interpreter's own fp32→bf16 cast does not round to nearest-even.

Triton is optional: it is imported on first use. With TRITON_INTERPRET=1 set before triton is imported,
the kernels run on CPU tensors (slowly), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from functools import lru_cache

import torch

REFERENCE_ATOL = 1e-5  # |reference_noise − noise| bound (only log/sin/cos rounding differs)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GPU_QUADS = 256  # quads (4 elements) per program on a GPU: 1024 elements, 4 warps
_INTERP_QUADS = 4096  # the interpreter pays per program, so it gets big blocks (the stream is unchanged)
_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85

tl = None  # triton.language, bound by _kernels() on first use (the kernel sources resolve it here)
_tl_uniform = _tl_box_muller = _normals = _load_f32 = _store_rounded = None  # jitted *_src, by _kernels()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    """Whether these kernels can run on `device`: triton is installed and the device is CUDA, or it is
    the CPU under the triton interpreter (TRITON_INTERPRET=1)."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


# ---------------------------------------------------------------------------------------------------
# Kernel sources. Plain functions here; _kernels() wraps them with triton.jit once triton is imported,
# binding them under the names the kernel bodies call (_normals) in this module's globals.
# ---------------------------------------------------------------------------------------------------


def _uniform_src(x):
    v = x.to(tl.int32, bitcast=True)
    v = tl.where(v < 0, ~v, v)
    return v.to(tl.float32) * 4.6566127342e-10


def _box_muller_src(u1, u2):
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt_rn(-2.0 * tl.log(u1))
    return r * tl.cos(th), r * tl.sin(th)


def _normals_src(key, q):
    # The stream, written out rather than taken from tl.randn4x so a triton upgrade cannot change it
    # (today it equals tl.randn4x(key, q) except that sqrt is correctly rounded here).
    k64 = tl.to_tensor(key).to(tl.uint64)  # keys arrive as i32, u32 or i64 scalars (by value)
    k0 = (k64 & 0xFFFFFFFF).to(tl.uint32)
    k1 = (k64 >> 32).to(tl.uint32)
    c0 = q.to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c2
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(_c2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(_c0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    n0, n1 = _tl_box_muller(_tl_uniform(c0), _tl_uniform(c1))
    n2, n3 = _tl_box_muller(_tl_uniform(c2), _tl_uniform(c3))
    # Four normals per Philox call; interleave so position 4·j + lane holds lane `lane` of quad q[j].
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


def _load_f32_src(ptrs, mask, SRC_T: tl.constexpr):
    # bf16 widened by a shift (exact); other dtypes by the native conversion (exact).
    if SRC_T == tl.bfloat16:
        raw = tl.load(ptrs.to(tl.pointer_type(tl.uint16)), mask=mask, other=0)
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


def _store_rounded_src(ptrs, y, mask, OUT_T: tl.constexpr):
    # fp32 → bf16 round-to-nearest-even in integer arithmetic (NaN → 0x7FC0 as in torch): bit-exact
    # on every backend, where the triton interpreter's own bf16 cast rounds ties and carries wrongly.
    if OUT_T == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        r = (b + (0x7FFF + ((b >> 16) & 1))) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        tl.store(ptrs.to(tl.pointer_type(tl.uint16)), r.to(tl.uint16), mask=mask)
    else:
        tl.store(ptrs, y.to(OUT_T), mask=mask)


def _add_kernel_src(src_ptr, out_ptr, numel, key, alpha, SRC_T: tl.constexpr, OUT_T: tl.constexpr,
                    QUADS: tl.constexpr, HAS_SRC: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    q = blk * QUADS + tl.arange(0, QUADS).to(tl.int64)
    z = _normals(key, q)
    e = blk * (4 * QUADS) + tl.arange(0, 4 * QUADS).to(tl.int64)
    mask = e < numel
    if HAS_SRC:
        y = _load_f32(src_ptr + e, mask, SRC_T) + alpha * z
    else:
        y = z
    _store_rounded(out_ptr + e, y, mask, OUT_T)


def _group_kernel_src(table_ptr, alpha_ptr, n_tensors, SRC_T: tl.constexpr, OUT_T: tl.constexpr,
                      QUADS: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    # table rows: (src address, out address, numel, key, first block); row n_tensors holds the total.
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    hi = lo + n_tensors
    for _ in tl.static_range(SEARCH_STEPS):  # largest t with first_block[t] <= pid
        mid = (lo + hi) // 2
        take = tl.load(table_ptr + mid * 5 + 4) <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    row = table_ptr + lo * 5
    src_ptr = tl.load(row).to(tl.pointer_type(SRC_T))
    out_ptr = tl.load(row + 1).to(tl.pointer_type(OUT_T))
    numel = tl.load(row + 2)
    key = tl.load(row + 3)
    blk = pid - tl.load(row + 4)
    alpha = tl.load(alpha_ptr + lo)
    q = blk * QUADS + tl.arange(0, QUADS).to(tl.int64)
    z = _normals(key, q)
    e = blk * (4 * QUADS) + tl.arange(0, 4 * QUADS).to(tl.int64)
    mask = e < numel
    y = _load_f32(src_ptr + e, mask, SRC_T) + alpha * z
    _store_rounded(out_ptr + e, y, mask, OUT_T)


def _rows_kernel_src(src_ptr, ids_ptr, out_ptr, n_rows, cols, key, alpha, SRC_T: tl.constexpr,
                     QUADS: tl.constexpr):
    # Program (i, j): output row i (= table row ids[i]), j-th run of QUADS quads overlapping that row.
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    r = tl.load(ids_ptr + i).to(tl.int64)
    r = tl.where(r < 0, r + n_rows, r)
    start = r * cols
    q0 = start // 4 + j * QUADS
    q = q0 + tl.arange(0, QUADS).to(tl.int64)
    z = _normals(key, q)
    e = q0 * 4 + tl.arange(0, 4 * QUADS).to(tl.int64)
    mask = (e >= start) & (e < start + cols)
    y = _load_f32(src_ptr + e, mask, SRC_T) + alpha * z
    _store_rounded(out_ptr + i * cols + (e - start), y, mask, SRC_T)


@lru_cache(maxsize=1)
def _kernels() -> dict:
    global tl
    import triton
    import triton.language as _tl

    tl = _tl
    g = globals()
    g["_tl_uniform"] = triton.jit(_uniform_src)
    g["_tl_box_muller"] = triton.jit(_box_muller_src)
    g["_normals"] = triton.jit(_normals_src)
    g["_load_f32"] = triton.jit(_load_f32_src)
    g["_store_rounded"] = triton.jit(_store_rounded_src)
    return {  # keys change every call: no value specialisation (it would only multiply compiles)
        "add": triton.jit(_add_kernel_src, do_not_specialize=["key"]),
        "group": triton.jit(_group_kernel_src),
        "rows": triton.jit(_rows_kernel_src, do_not_specialize=["key"]),
        "dtypes": {torch.float32: _tl.float32, torch.float16: _tl.float16, torch.bfloat16: _tl.bfloat16},
    }


def _quads(device: torch.device) -> int:
    return _INTERP_QUADS if device.type == "cpu" else _GPU_QUADS


def _launch_opts(device: torch.device) -> dict:
    # No FMA contraction: x + α·z rounds twice in fp32 everywhere, so every kernel (and torch) agrees.
    return {} if device.type == "cpu" else {"num_warps": 4, "enable_fp_fusion": False}


def _check(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what}: dtype {t.dtype} not supported (fp32, fp16, bf16)")
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous")
    if not available(t.device):
        raise RuntimeError(f"{what}: triton noise kernels unavailable on {t.device} "
                           "(need triton, and CUDA or TRITON_INTERPRET=1 on the CPU)")


def _check_key(key: int) -> int:
    key = int(key)
    if not 0 <= key < 1 << 63:
        raise ValueError(f"key must be a 63-bit non-negative int (edgezo.noise.mix), got {key}")
    return key


def add_noise_(out: torch.Tensor, src: torch.Tensor, key: int, alpha: float) -> torch.Tensor:
    """out = (fp32(src) + α·z) rounded once to out.dtype, z the stream for `key` = mix(seed, index).

    One read of src and one write of out per element, no noise tensor; out may be src (in place).
    """
    _check(src, "add_noise_ src")
    _check(out, "add_noise_ out")
    if out.shape != src.shape or out.device != src.device:
        raise ValueError(f"add_noise_: out {tuple(out.shape)}@{out.device} vs src {tuple(src.shape)}@{src.device}")
    key = _check_key(key)
    n = src.numel()
    if n == 0:
        return out
    k = _kernels()
    quads = _quads(src.device)
    grid = (triton_cdiv(n, 4 * quads),)
    k["add"][grid](src, out, n, key, float(alpha), SRC_T=k["dtypes"][src.dtype], OUT_T=k["dtypes"][out.dtype],
                   QUADS=quads, HAS_SRC=True, **_launch_opts(src.device))
    return out


def triton_cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv without importing triton)."""
    return -(-a // b)


def add_noise_group_(outs: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], keys: Sequence[int],
                     alphas: Sequence[float]) -> None:
    """add_noise_ over many tensors in one launch per (device, src dtype, out dtype): a small table of
    addresses/numels/keys drives a grid over all (tensor, block) pairs, so a model's hundreds of small
    tensors cost one launch instead of hundreds. Bit-identical to per-tensor add_noise_ calls."""
    if not (len(outs) == len(srcs) == len(keys) == len(alphas)):
        raise ValueError("add_noise_group_: outs, srcs, keys and alphas must have the same length")
    groups: dict[tuple, list[int]] = {}
    for j, (o, s) in enumerate(zip(outs, srcs)):
        _check(s, f"add_noise_group_ srcs[{j}]")
        _check(o, f"add_noise_group_ outs[{j}]")
        if o.shape != s.shape or o.device != s.device:
            raise ValueError(f"add_noise_group_[{j}]: out {tuple(o.shape)}@{o.device} vs src "
                             f"{tuple(s.shape)}@{s.device}")
        if s.numel():
            groups.setdefault((s.device, s.dtype, o.dtype), []).append(j)
    checked_keys = [_check_key(k) for k in keys]
    if not groups:
        return
    k = _kernels()
    for (device, src_dtype, out_dtype), members in groups.items():
        quads = _quads(device)
        block = 4 * quads
        rows, first = [], 0
        for j in members:
            n = srcs[j].numel()
            rows.append([srcs[j].data_ptr(), outs[j].data_ptr(), n, checked_keys[j], first])
            first += triton_cdiv(n, block)
        rows.append([0, 0, 0, 0, first])  # sentinel: first block past the end
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        alpha_t = torch.tensor([float(alphas[j]) for j in members], dtype=torch.float32).to(device)
        steps = max(1, math.ceil(math.log2(len(members)))) if len(members) > 1 else 1
        k["group"][(first,)](table, alpha_t, len(members), SRC_T=k["dtypes"][src_dtype],
                             OUT_T=k["dtypes"][out_dtype], QUADS=quads, SEARCH_STEPS=steps,
                             **_launch_opts(device))


def rows(src: torch.Tensor, ids: torch.Tensor, key: int, alpha: float) -> torch.Tensor:
    """(src + α·z)[ids] for a 2-D table, generating noise only for the looked-up rows (counter-based).

    Result shape ids.shape + (cols,), dtype src.dtype, one fp32 rounding; negative ids count from
    the end as in torch indexing. Bit-identical to add_noise_ on the whole table, then indexing.
    """
    _check(src, "rows src")
    if src.dim() != 2:
        raise ValueError(f"rows: src must be 2-D, got shape {tuple(src.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"rows: ids must be an integer tensor, got {ids.dtype}")
    key = _check_key(key)
    n_rows, cols = src.shape
    flat = ids.reshape(-1).to(device=src.device, dtype=torch.int64).contiguous()
    out = torch.empty((*ids.shape, cols), dtype=src.dtype, device=src.device)
    if flat.numel() == 0 or cols == 0:
        return out
    in_range = ((flat >= -n_rows) & (flat < n_rows)).all()
    if src.device.type == "cuda":
        torch._assert_async(in_range)  # no host sync on the hot path
    elif not bool(in_range):
        raise IndexError(f"rows: ids out of range for a table of {n_rows} rows")
    k = _kernels()
    quads = _quads(src.device)
    grid = (flat.numel(), triton_cdiv(triton_cdiv(cols, 4) + 1, quads))
    k["rows"][grid](src, flat, out, n_rows, cols, key, float(alpha), SRC_T=k["dtypes"][src.dtype], QUADS=quads,
                    **_launch_opts(src.device))
    return out


def noise(numel_or_shape: int | Sequence[int] | torch.Size, key: int, device: torch.device | str) -> torch.Tensor:
    """z itself in fp32 (tests, the reference check, and callers that want the direction)."""
    device = torch.device(device)
    shape = (numel_or_shape,) if isinstance(numel_or_shape, int) else tuple(numel_or_shape)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    _check(out, "noise")
    key = _check_key(key)
    n = out.numel()
    if n == 0:
        return out
    k = _kernels()
    quads = _quads(device)
    k["add"][(triton_cdiv(n, 4 * quads),)](out, out, n, key, 1.0, SRC_T=tl.float32, OUT_T=tl.float32,
                                           QUADS=quads, HAS_SRC=False, **_launch_opts(device))
    return out


# ---------------------------------------------------------------------------------------------------
# Pure-torch reference (CPU, no triton): the same stream, integer parts bit-exact.
# ---------------------------------------------------------------------------------------------------


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product of a 32-bit constant and 32-bit values, in int64
    without overflow (the product is split on b's 16-bit halves)."""
    p_lo = a * (b & 0xFFFF)  # < 2⁴⁸
    p_hi = a * (b >> 16)  # < 2⁴⁸
    t = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2⁴⁹
    return (p_hi >> 16) + (t >> 32), t & _MASK32


def philox_rounds(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int,
                  n_rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 words (general counters, for known-answer tests)."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox4x32_10(key: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (q mod 2³², q >> 32, 0, 0) under key (k mod 2³², k >> 32), as four
    int64 tensors holding uint32 values (what tl.randint4x(k, q) returns, as unsigned)."""
    q = counters.to(torch.int64)
    zero = torch.zeros_like(q)
    return philox_rounds(q & _MASK32, (q >> 32) & _MASK32, zero, zero.clone(), key & _MASK32,
                         (key >> 32) & _MASK32)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    v = torch.where(x >= 1 << 31, _MASK32 - x, x).to(torch.int32)  # int32 view, ~x when negative
    return v.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.maximum(u1, torch.tensor(1.0e-7, dtype=torch.float32))
    th = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    r = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def reference_noise(shape: int | Sequence[int] | torch.Size, key: int) -> torch.Tensor:
    """The stream computed on the CPU in pure torch (no triton), fp32: an independent check of the
    kernels and a way to regenerate a direction where triton is absent. Integer and uniform parts are
    exact; log/sin/cos rounding may differ from a backend's by at most REFERENCE_ATOL."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    key = _check_key(key)
    n = math.prod(shape)
    q = torch.arange(triton_cdiv(n, 4), dtype=torch.int64)
    x0, x1, x2, x3 = philox4x32_10(key, q)
    z0, z1 = _box_muller(_uniform(x0), _uniform(x1))
    z2, z3 = _box_muller(_uniform(x2), _uniform(x3))
    return torch.stack([z0, z1, z2, z3], dim=1).reshape(-1)[:n].reshape(shape)
