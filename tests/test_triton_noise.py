"""The counter-based philox noise stream and its fused Triton kernels (edgezo.triton_noise).

Without CUDA the kernels run on CPU tensors under the triton interpreter (TRITON_INTERPRET=1 must be
set before triton is imported, hence at the top of this module); with CUDA they run on the GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from edgezo import triton_noise as tn  # noqa: E402
from edgezo.noise import mix  # noqa: E402

DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")
if not tn.available(DEVICE):
    pytest.skip(f"triton noise kernels unavailable on {DEVICE}", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KEY = mix(20240611, 3)


def _expected(src: torch.Tensor, key: int, alpha: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The contract computed independently in torch: fp32(src) + fp32(α)·z, rounded once."""
    z = tn.noise(src.shape, key, src.device)
    a = torch.tensor(alpha, dtype=torch.float32, device=src.device)
    return (src.float() + a * z).to(out_dtype or src.dtype)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal would call -0.0 == 0.0 and fail on NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@triton.jit
def _randint4x_window_kernel(out_ptr, key, q0, n, BLOCK: tl.constexpr):
    j = tl.arange(0, BLOCK).to(tl.int64)
    x0, x1, x2, x3 = tl.randint4x(key, q0 + j)
    m = j < n
    tl.store(out_ptr + 4 * j + 0, x0.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * j + 1, x1.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * j + 2, x2.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * j + 3, x3.to(tl.uint32, bitcast=True).to(tl.int64), mask=m)


def _randint4x_window(key: int, q0: int, n: int) -> torch.Tensor:
    out = torch.empty(4 * n, dtype=torch.int64, device=DEVICE)
    _randint4x_window_kernel[(1,)](out, key, q0, n, BLOCK=triton.next_power_of_2(n))
    return out.view(-1, 4).cpu()


# ---------------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------------


def _check_determinism(device: torch.device) -> None:
    a = tn.noise(5000, KEY, device)
    b = tn.noise(5000, KEY, device)
    assert _bits_equal(a, b)
    other_seed = tn.noise(5000, mix(20240612, 3), device)
    other_param = tn.noise(5000, mix(20240611, 4), device)
    for other in (other_seed, other_param):
        assert (other != a).float().mean() > 0.99
    # Shape only reshapes the flat stream; a longer tensor extends it (element e depends on (k, e) only).
    assert _bits_equal(tn.noise((50, 100), KEY, device).reshape(-1), a)
    assert _bits_equal(tn.noise(7001, KEY, device)[:5000], a)


def test_noise_is_a_pure_function_of_key_and_element():
    _check_determinism(DEVICE)


def test_noise_does_not_depend_on_block_size(monkeypatch):
    """Program/block layout is an implementation detail: a small block gives the same bits."""
    full = tn.noise(1003, KEY, DEVICE)
    monkeypatch.setattr(tn, "_INTERP_QUADS", 8)
    monkeypatch.setattr(tn, "_GPU_QUADS", 8)
    assert _bits_equal(tn.noise(1003, KEY, DEVICE), full)


def test_noise_statistics():
    z = tn.noise(100_000, mix(7, 0), DEVICE).double().cpu()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.02  # 5 standard errors
    assert abs(z.std().item() - 1.0) < 0.02
    assert 0.68 - 0.01 < (z.abs() < 1).double().mean().item() < 0.6827 + 0.01
    assert z.abs().max().item() < 5.7  # u ≥ 1e-7 caps |z| at sqrt(-2 ln 1e-7) ≈ 5.68
    lanes = z.reshape(-1, 4)
    for j in range(4):  # each lane is itself standard normal
        assert abs(lanes[:, j].mean().item()) < 0.04 and abs(lanes[:, j].std().item() - 1.0) < 0.04
    corr = torch.corrcoef(lanes.T)  # lanes of one Philox call, incl. the Box-Muller pairs (0,1), (2,3)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 0.03
    sq = torch.corrcoef((lanes**2).T)  # Box-Muller pairs share r: squares must not correlate either
    assert (sq - torch.eye(4, dtype=sq.dtype)).abs().max().item() < 0.03
    nxt = torch.corrcoef(torch.stack([z[:-4], z[4:]]))[0, 1].item()  # neighbouring quads
    assert abs(nxt) < 0.03
    # Neighbouring keys (parameter indices i, i+1) are unrelated.
    w = tn.noise(100_000, mix(7, 1), DEVICE).double().cpu()
    assert abs(torch.corrcoef(torch.stack([z, w]))[0, 1].item()) < 0.02


def test_reference_matches_triton_integers_exactly_and_floats_within_bound():
    # Philox4x32-10 known-answer vectors (Random123 kat_vectors).
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, want in kat:
        got = tn.philox_rounds(*[torch.tensor([c]) for c in ctr], *key)
        assert [int(g) for g in got] == list(want)
    # Integer part against triton's own tl.randint4x, including counters past 2³² (c1 ≠ 0).
    for key, q0 in ((KEY, 0), (mix(1, 2), (1 << 32) - 100), (0, 5), ((1 << 63) - 1, 1 << 40)):
        ref = torch.stack(tn.philox4x32_10(key, torch.arange(q0, q0 + 256)), dim=1)
        assert torch.equal(_randint4x_window(key, q0, 256), ref)
    # Floats: only log/sin/cos rounding may differ.
    worst = 0.0
    # Keys of every width the launcher may type them as: i32, u32 (≥ 2³¹), i64, and 0 / 1.
    for key in (KEY, mix(99, 0), 0, 1, (1 << 31) + 5, (1 << 32) - 1, (1 << 63) - 1):
        z = tn.noise(20_001, key, DEVICE).cpu()
        r = tn.reference_noise(20_001, key)
        worst = max(worst, (z - r).abs().max().item())
    assert worst <= tn.REFERENCE_ATOL
    assert tn.reference_noise((3, 5), KEY).shape == (3, 5)
    assert tn.reference_noise((), KEY).shape == ()


def test_counter_high_word_matters():
    """Quads past 2³² (tensors over 16 Gi elements) use the counter's high word: no wrap-around."""
    q0 = (1 << 32) + 10
    far = _randint4x_window(KEY, q0, 8)
    assert torch.equal(far, torch.stack(tn.philox4x32_10(KEY, torch.arange(q0, q0 + 8)), dim=1))
    assert not torch.equal(far, _randint4x_window(KEY, 10, 8))


# ---------------------------------------------------------------------------------------------------
# Fused update
# ---------------------------------------------------------------------------------------------------


def _check_add_noise(device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(), (1,), (7,), (33, 17), (4, 5, 6)]:
        src = torch.randn(shape, generator=g).to(dtype).to(device)
        keep = src.clone()
        want = _expected(src, KEY, 1e-2)
        out = torch.empty_like(src)
        assert tn.add_noise_(out, src, KEY, 1e-2) is out
        assert _bits_equal(out, want)
        assert _bits_equal(src, keep)  # src untouched
        assert not _bits_equal(out, src) or src.numel() == 1  # the noise did something
        # In place: out is src.
        assert tn.add_noise_(src, src, KEY, 1e-2) is src
        assert _bits_equal(src, want)
    # Exactness: α = 0 leaves the weights bit-identical.
    w = torch.randn(300, generator=g).to(dtype).to(device)
    assert _bits_equal(tn.add_noise_(torch.empty_like(w), w, KEY, 0.0), w)
    # An fp32 source written to a narrower output is rounded once, from the fp32 sum.
    src32 = torch.randn(129, generator=g).to(device)
    out = torch.empty(129, dtype=dtype, device=device)
    tn.add_noise_(out, src32, KEY, 0.5)
    assert _bits_equal(out, _expected(src32, KEY, 0.5, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_add_noise_is_the_update_rounded_once(dtype):
    _check_add_noise(DEVICE, dtype)


def _check_narrowing(device: torch.device) -> None:
    """fp32 → fp16/bf16 in the kernels is round-to-nearest-even like torch's, on hard cases: ties,
    carries into the exponent, overflow to inf, subnormals; bf16 → fp32 widening is exact."""
    g = torch.Generator().manual_seed(5)
    hi = torch.randint(0, 1 << 16, (2000,), generator=g)
    patterns = torch.cat([
        torch.randint(0, 1 << 32, (6000,), generator=g),
        (hi << 16) | 0x8000,  # bf16 ties
        (hi << 16) | 0x7FFF, (hi << 16) | 0x8001,
        (hi << 13) | 0x1000,  # fp16 ties (for values in fp16's range)
        torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0xFF7FFFFF, 0x00008000, 0x00018000, 0x80008000, 0x7F800000,
                      0xFF800000, 0x00000001, 0x007FFFFF, 0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001]),
    ])
    x = torch.where(patterns >= 1 << 31, patterns - (1 << 32), patterns).to(torch.int32).view(torch.float32)
    x = x[~torch.isnan(x)].to(device)
    for dtype in (torch.float16, torch.bfloat16):
        out = torch.empty(x.shape, dtype=dtype, device=device)
        tn.add_noise_(out, x, KEY, 0.0)  # fp32(x) + 0·z = x (up to the sign of zero)
        want = x.to(dtype)
        nonzero = want != 0
        assert _bits_equal(out[nonzero], want[nonzero]), dtype
        assert (out[~nonzero] == 0).all()
    raw = torch.randint(-(1 << 15), 1 << 15, (20000,), generator=g, dtype=torch.int16).view(torch.bfloat16)
    raw = raw[~torch.isnan(raw) & (raw != 0)].to(device)
    wide = tn.add_noise_(torch.empty(raw.shape, device=device), raw, KEY, 0.0)
    assert _bits_equal(wide, raw.float())
    nan = tn.add_noise_(torch.empty(2, dtype=torch.bfloat16, device=device),
                        torch.tensor([float("nan"), 1.0], device=device), KEY, 0.0)
    assert torch.isnan(nan[0]) and nan[1] == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN case under the interpreter
def test_narrowing_rounds_to_nearest_even():
    _check_narrowing(DEVICE)


def test_add_noise_rejects_what_it_cannot_do():
    src = torch.zeros(4, 6, device=DEVICE)
    with pytest.raises(ValueError):
        tn.add_noise_(torch.empty(6, 4, device=DEVICE).T, src.T.contiguous(), KEY, 1.0)  # non-contiguous out
    with pytest.raises(ValueError):
        tn.add_noise_(torch.empty(24, device=DEVICE), src, KEY, 1.0)  # shape mismatch
    with pytest.raises(ValueError):
        tn.add_noise_(src, src, 1 << 63, 1.0)  # keys are 63-bit (mix)
    with pytest.raises(TypeError):
        tn.add_noise_(src.double(), src.double(), KEY, 1.0)
    assert tn.add_noise_(torch.empty(0, 3, device=DEVICE), torch.empty(0, 3, device=DEVICE), KEY, 1.0).numel() == 0
    assert not tn.available(torch.device("meta"))
    assert tn.available(DEVICE)


# ---------------------------------------------------------------------------------------------------
# Rows of a table (subset property)
# ---------------------------------------------------------------------------------------------------


def _check_rows(device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    for n_rows, cols in [(37, 13), (20, 8), (9, 1), (5, 130)]:  # row starts not all quad-aligned
        table = torch.randn(n_rows, cols, generator=g).to(dtype).to(device)
        full = tn.add_noise_(torch.empty_like(table), table, KEY, 0.25)
        ids = torch.tensor([[0, n_rows - 1, 3 % n_rows, 3 % n_rows], [-1, 1, 2 % n_rows, 0]], device=device)
        got = tn.rows(table, ids, KEY, 0.25)
        assert got.shape == (2, 4, cols) and got.dtype == dtype
        assert _bits_equal(got, full[ids])
        one = torch.tensor(n_rows // 2, device=device)  # 0-d ids → one row
        assert _bits_equal(tn.rows(table, one, KEY, 0.25), full[n_rows // 2])
        assert tn.rows(table, torch.empty(0, dtype=torch.long, device=device), KEY, 0.25).shape == (0, cols)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_rows_equal_the_same_rows_of_the_whole_update(dtype):
    _check_rows(DEVICE, dtype)


def test_rows_with_small_blocks_span_several_programs(monkeypatch):
    """A row longer than one program's block is covered by several programs, still bit-identical."""
    monkeypatch.setattr(tn, "_INTERP_QUADS", 4)
    monkeypatch.setattr(tn, "_GPU_QUADS", 4)
    table = torch.randn(6, 70, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    full = _expected(table, KEY, 1.5)
    ids = torch.tensor([5, 2, 2, 0, 3], dtype=torch.int32, device=DEVICE)
    assert _bits_equal(tn.rows(table, ids, KEY, 1.5), full[ids.long()])


def test_rows_checks_ids():
    table = torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(ValueError):
        tn.rows(torch.zeros(12, device=DEVICE), torch.tensor([0], device=DEVICE), KEY, 1.0)
    with pytest.raises(TypeError):
        tn.rows(table, torch.tensor([0.0], device=DEVICE), KEY, 1.0)
    if DEVICE.type == "cpu":
        with pytest.raises(IndexError):
            tn.rows(table, torch.tensor([4], device=DEVICE), KEY, 1.0)


# ---------------------------------------------------------------------------------------------------
# Grouped launch
# ---------------------------------------------------------------------------------------------------


def _group_case(device: torch.device) -> tuple[list, list, list, list]:
    g = torch.Generator().manual_seed(3)
    specs = [  # (shape, src dtype, out dtype): mixed sizes, incl. one past the interpreter's block
        ((), torch.float32, torch.float32),
        ((33,), torch.float16, torch.float16),  # a 1-d bias
        ((17, 29), torch.float16, torch.float16),
        ((0, 5), torch.float16, torch.float16),  # empty: skipped
        ((40_003,), torch.float32, torch.float32),  # several blocks, ragged tail
        ((5, 7), torch.bfloat16, torch.bfloat16),
        ((3,), torch.bfloat16, torch.bfloat16),
        ((9, 11), torch.float32, torch.bfloat16),  # fp32 source written as bf16
        ((2, 3, 4), torch.float32, torch.float32),
    ]
    srcs = [torch.randn(shape, generator=g).to(sd).to(device) for shape, sd, _ in specs]
    outs = [torch.empty(s.shape, dtype=od, device=device) for s, (_, _, od) in zip(srcs, specs)]
    keys = [mix(555, i) for i in range(len(specs))]
    alphas = [0.1 * (i + 1) * (-1) ** i for i in range(len(specs))]
    return outs, srcs, keys, alphas


def _check_group(device: torch.device) -> None:
    outs, srcs, keys, alphas = _group_case(device)
    want = []
    for o, s, k, a in zip(outs, srcs, keys, alphas):
        want.append(tn.add_noise_(torch.empty_like(o), s, k, a))
    tn.add_noise_group_(outs, srcs, keys, alphas)
    for j, (o, w) in enumerate(zip(outs, want)):
        assert _bits_equal(o, w), f"tensor {j} {tuple(o.shape)} differs from add_noise_"
    # In place, as the optimiser's update would run it.
    before = [s.clone() for s in srcs]
    tn.add_noise_group_(srcs, srcs, keys, alphas)
    for j, (s, b) in enumerate(zip(srcs, before)):
        assert _bits_equal(s, tn.add_noise_(torch.empty_like(b), b, keys[j], alphas[j]))


def test_group_equals_per_tensor_calls():
    _check_group(DEVICE)


def test_group_with_many_tensors_and_small_blocks(monkeypatch):
    """Binary search over the table with more tensors than blocks in any one of them."""
    monkeypatch.setattr(tn, "_INTERP_QUADS", 4)
    monkeypatch.setattr(tn, "_GPU_QUADS", 4)
    g = torch.Generator().manual_seed(4)
    srcs = [torch.randn(n, generator=g).to(DEVICE) for n in (1, 16, 17, 3, 40, 15, 64, 2, 33, 5, 100)]
    outs = [torch.empty_like(s) for s in srcs]
    keys = [mix(9, i) for i in range(len(srcs))]
    alphas = [0.3] * len(srcs)
    tn.add_noise_group_(outs, srcs, keys, alphas)
    for o, s, k, a in zip(outs, srcs, keys, alphas):
        assert _bits_equal(o, _expected(s, k, a))
    with pytest.raises(ValueError):
        tn.add_noise_group_(outs, srcs, keys[:-1], alphas)
    tn.add_noise_group_([], [], [], [])


# ---------------------------------------------------------------------------------------------------
# On the GPU
# ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: kernels would not be compiled for the GPU")
    dev = torch.device("cuda")
    assert tn.available(dev)
    _check_determinism(dev)
    _check_narrowing(dev)
    for dtype in DTYPES:
        _check_add_noise(dev, dtype)
        _check_rows(dev, dtype)
    _check_group(dev)
    # Counter-based stream: the GPU's integers are the reference's; floats within the bound.
    z = tn.noise(1_000_003, KEY, dev).cpu()
    assert (z - tn.reference_noise(1_000_003, KEY)).abs().max().item() <= tn.REFERENCE_ATOL
    assert abs(z.double().mean().item()) < 0.005 and abs(z.double().std().item() - 1) < 0.005
    # A large table: a few rows alone equal the same rows of the whole update.
    table = torch.randn(50_000, 257, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, 50_000, (8, 64), device=dev)
    full = tn.add_noise_(torch.empty_like(table), table, KEY, 1e-3)
    assert _bits_equal(tn.rows(table, ids, KEY, 1e-3), full[ids])
    torch.cuda.synchronize()


# The interpreter runs the kernels' Python, not their GPU lowering. This compiles every kernel, for
# every dtype, down to a cubin for GPUs we target, with no GPU: consumer Turing (sm_75), Jetson Orin
# (sm_87) and Hopper (sm_90). A kernel that only the GPU compiler rejects fails here, not on a user's
# device in the middle of a job.
_AOT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from edgezo import triton_noise as tn

k = tn._kernels()
T = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
done = []
for arch in json.loads(sys.argv[1]):
    for d, t in T.items():
        p = "*" + d
        cases = {
            "add": ({"src_ptr": p, "out_ptr": p, "numel": "i64", "key": "i64", "alpha": "fp32", "SRC_T": "constexpr",
                     "OUT_T": "constexpr", "QUADS": "constexpr", "HAS_SRC": "constexpr"},
                    {"SRC_T": t, "OUT_T": t, "QUADS": tn._GPU_QUADS, "HAS_SRC": True}),
            "group": ({"table_ptr": "*i64", "alpha_ptr": "*fp32", "n_tensors": "i32", "SRC_T": "constexpr",
                       "OUT_T": "constexpr", "QUADS": "constexpr", "SEARCH_STEPS": "constexpr"},
                      {"SRC_T": t, "OUT_T": t, "QUADS": tn._GPU_QUADS, "SEARCH_STEPS": 8}),
            "rows": ({"src_ptr": p, "ids_ptr": "*i64", "out_ptr": p, "n_rows": "i64", "cols": "i64", "key": "i64",
                      "alpha": "fp32", "SRC_T": "constexpr", "QUADS": "constexpr"},
                     {"SRC_T": t, "QUADS": tn._GPU_QUADS}),
        }
        for name, (sig, consts) in cases.items():
            c = triton.compile(ASTSource(fn=k[name], signature=sig, constexprs=consts),
                               target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "enable_fp_fusion": False})
            assert len(c.asm["cubin"]) > 1000, (arch, d, name)
            done.append(f"{arch}/{d}/{name}")
print(json.dumps(done))
"""


def test_kernels_compile_to_cubin_for_turing_orin_and_hopper(tmp_path):
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from an earlier run's cache
    r = subprocess.run([sys.executable, "-c", _AOT, "[75, 87, 90]"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(done) == 3 * 3 * 3
