"""A ZO step against its two forward passes and against a faithful MeZO-reference step, in one run.

    python bench/zo_step.py                       # CPU: OPT-125m shape, fp32, batch 8, seq 64
    python bench/zo_step.py --model opt-2.7b --dtype fp16 --batch 16 --seq 64 --device cuda
    python bench/zo_step.py --noise torch,philox     # one edgezo row per noise stream (philox: Triton)
    python bench/zo_step.py --directions dense,lowrank --rank 1   # one row per direction kind (default)
    python bench/zo_step.py --compile                # also a torch.compile'd forward (CUDA graphs on GPU)

Times (medians after warm-up, variants interleaved round by round so machine noise hits all alike):
  forward   one forward computing only the logits the loss needs (last position, 2 label rows)
  reference MeZO's algorithm as released: seed reset, per-parameter torch.normal, out-of-place
            θ + s·ε·z, four sweeps (+ε, −2ε, +ε, update), full-vocabulary logits and LM loss
  edgezo-N  edgezo's MeZO step with noise stream N (on-the-fly perturbation, 3 noise passes,
            last-position logits); "torch": chunked torch.Generator, "philox": fused Triton kernels
  edgezo-N-lowrank  the same with low-rank directions (optim.directions: lowrank, --rank r): each
            Linear weight's z = U·Vᵀ/√r is applied inside the forward as α·(x·V)·Uᵀ/√r, the token
            table's as its looked-up rows' U[ids]·Vᵀ/√r; OPT's learned positions (an Embedding
            subclass) and 1-D tensors keep stream N's dense noise
Random numbers per step: elements drawn through Tensor.normal_ during one step, all passes (torch
generators only: philox draws inside its kernels, so its rows show the count of its torch-drawn part,
i.e. the low-rank factors); "per direction" is how many random numbers define one direction.
  forward-compiled (--compile) the same forward through torch.compile (mode reduce-overhead, i.e.
            CUDA graphs, on a GPU), unperturbed: the most compiling the forward could save
Peak memory: CUDA max_memory_allocated in-process; on CPU each variant runs in its own child
process and reports its peak RSS during one measured call (high-water mark reset first), so the
figures do not contaminate each other.
Random weights: speed and memory do not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edgezo.lowrank import with_directions  # noqa: E402
from edgezo.noise import make_noise  # noqa: E402
from edgezo.perturb import Perturber, collect_params  # noqa: E402
from edgezo.zo import MeZO  # noqa: E402

SHAPES = {  # OPT family shapes (hidden, layers, heads, ffn)
    "opt-125m": (768, 12, 12, 3072),
    "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(name: str, dtype: torch.dtype, device: torch.device):
    from transformers import OPTConfig, OPTForCausalLM

    hidden, layers, heads, ffn = SHAPES[name]
    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=hidden)
    torch.manual_seed(0)
    with torch.device(device):
        model = OPTForCausalLM(cfg).to(dtype)
    model.eval().requires_grad_(False)
    return model


class Bench:
    def __init__(self, args):
        self.device = torch.device(args.device)
        self.model = build(args.model, DTYPES[args.dtype], self.device)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(4, 50000, (args.batch, args.seq), generator=g).to(self.device)
        self.mask = torch.ones_like(self.ids)
        self.labels = torch.tensor([i % 2 for i in range(args.batch)], device=self.device)
        self.verb = torch.tensor([1000, 2000], device=self.device)
        self.params = collect_params(self.model, None)
        self.rank = args.rank
        self.perturber = Perturber(self.params)
        self.mezo = MeZO(self.params, self.perturber, lr=1e-9, eps=1e-3, seed=0)
        self.noises = {n: make_noise(n, self.device) for n in args.noise.split(",")}
        self.decoder = self.model.model
        self.head = self.model.get_output_embeddings().weight
        self.step_no = 0
        self.compiled = None
        if args.compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.compiled = torch.compile(self.decoder, mode=mode)

    # --- edgezo -----------------------------------------------------------------------------
    @torch.inference_mode()
    def loss_needed_logits(self) -> float:
        h = self.decoder(input_ids=self.ids, attention_mask=self.mask).last_hidden_state[:, -1]
        logits = h.float() @ self.perturber.rows(self.head, self.verb).float().T
        return float(F.cross_entropy(logits, self.labels))

    def forward(self) -> None:
        self.loss_needed_logits()

    @torch.inference_mode()
    def forward_compiled(self) -> None:
        h = self.compiled(input_ids=self.ids, attention_mask=self.mask).last_hidden_state[:, -1]
        logits = h.float() @ self.head[self.verb].float().T
        float(F.cross_entropy(logits, self.labels))

    def use(self, directions: str) -> None:
        """Hooks for one direction kind only (a Perturber installs its hooks for its kind's life)."""
        if self.perturber.directions != directions:
            self.perturber.remove()
            self.perturber = Perturber(self.params, directions=directions, rank=self.rank)
            self.mezo.perturber = self.perturber

    def prepare(self, variant: str) -> None:
        """Untimed set-up before a variant runs: the hooks it needs."""
        self.use(variant_kind(variant)[1] if variant.startswith("edgezo-") else "dense")

    def edgezo(self, noise: str, directions: str = "dense") -> None:
        self.use(directions)
        self.perturber.noise = self.noises[noise]
        with torch.inference_mode():
            self.mezo.step(self.step_no, self.loss_needed_logits)
        self.step_no += 1

    def run(self, variant: str) -> None:
        if variant.startswith("edgezo-"):
            self.edgezo(*variant_kind(variant))
        else:
            self.prepare(variant)
            getattr(self, variant.replace("-", "_"))()

    def randoms(self, variant: str) -> tuple[int, int]:
        """(numbers drawn through Tensor.normal_ during one step of `variant`, numbers per direction)."""
        self.prepare(variant)
        if variant.startswith("edgezo-"):
            noise, kind = variant_kind(variant)
            per_dir = (with_directions(kind, self.noises[noise], self.params, self.rank)
                       .numbers_per_direction(self.params) if kind == "lowrank"
                       else sum(p.param.numel() for p in self.params))
        else:
            per_dir = sum(p.param.numel() for p in self.params) if variant == "reference" else 0
        drawn = [0]
        real_normal, real_torch_normal = torch.Tensor.normal_, torch.normal

        def normal_(t, *a, **k):
            drawn[0] += t.numel()
            return real_normal(t, *a, **k)

        def normal(*a, **k):
            out = real_torch_normal(*a, **k)
            drawn[0] += out.numel()
            return out

        torch.Tensor.normal_, torch.normal = normal_, normal
        try:
            self.run(variant)
        finally:
            torch.Tensor.normal_, torch.normal = real_normal, real_torch_normal
        return drawn[0], per_dir

    # --- faithful MeZO reference (re-implemented from the algorithm) --------------------------
    @torch.inference_mode()
    def _ref_loss(self) -> float:
        out = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids)
        return float(out.loss)

    @torch.inference_mode()
    def _ref_perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for _, p in self.model.named_parameters():
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * 1e-3 * z

    @torch.inference_mode()
    def reference(self) -> None:
        seed = 1000 + self.step_no
        self._ref_perturb(seed, 1)
        lp = self._ref_loss()
        self._ref_perturb(seed, -2)
        lm = self._ref_loss()
        self._ref_perturb(seed, 1)
        g = (lp - lm) / 2e-3
        torch.manual_seed(seed)
        for _, p in self.model.named_parameters():
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data - 1e-9 * g * z
        self.step_no += 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def variant_kind(variant: str) -> tuple[str, str]:
    """(noise stream, direction kind) of an edgezo-N or edgezo-N-lowrank variant."""
    name = variant.removeprefix("edgezo-")
    return (name.removesuffix("-lowrank"), "lowrank") if name.endswith("-lowrank") else (name, "dense")


def variants(noise: str, compile_: bool = False, directions: str = "dense") -> list[str]:
    kinds = directions.split(",")
    return ["forward", "reference",
            *(f"edgezo-{n}" + ("" if k == "dense" else f"-{k}") for k in kinds for n in noise.split(",")),
            *(["forward-compiled"] if compile_ else [])]


def time_all(b: Bench, names: list[str], reps: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(warmup + reps):
        for v in names:
            b.prepare(v)
            b.sync()
            t = time.perf_counter()
            b.run(v)
            b.sync()
            if r >= warmup:
                times[v].append(time.perf_counter() - t)
    return times


def peak_cuda(b: Bench, variant: str) -> int:
    b.prepare(variant)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    b.run(variant)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def measured_peak_rss(fn) -> int:
    """Peak RSS while fn runs: reset the kernel's high-water mark first (Linux clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: fall back to the lifetime peak
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_peak(args, variant: str) -> int:
    """Peak RSS of a fresh process that builds the model and runs `variant` twice."""
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--dtype", args.dtype,
           "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device, "--noise", args.noise,
           "--rank", str(args.rank),
           *(["--compile"] if variant == "forward-compiled" else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-125m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--noise", default="torch", help="comma-separated noise streams to time (torch, philox)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd forward")
    ap.add_argument("--directions", default="dense,lowrank",
                    help="comma-separated direction kinds to time (dense, lowrank): one edgezo row per kind and stream")
    ap.add_argument("--rank", type=int, default=1, help="rank r of the lowrank directions")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    names = variants(args.noise, args.compile, args.directions)
    steps = [v for v in names if v.startswith("edgezo-")]

    if args.child:
        b = Bench(args)
        b.run(args.child)  # warm-up: lazy allocations, thread pools, kernel compilation
        b.prepare(args.child)
        print(json.dumps({"peak_bytes": measured_peak_rss(lambda: b.run(args.child))}))
        return

    b = Bench(args)
    n_params = sum(p.param.numel() for p in b.params)
    dev_name = torch.cuda.get_device_name() if b.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} shape ({n_params / 1e6:.0f} M params), {args.dtype}, batch {args.batch}, seq {args.seq}, "
          f"{dev_name}, torch {torch.__version__}, {args.reps} reps after {args.warmup} warm-up")
    times = time_all(b, names, args.reps, args.warmup)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    randoms = {v: b.randoms(v) for v in names if v.startswith("edgezo-") or v == "reference"}
    if b.device.type == "cuda":
        peaks = {v: peak_cuda(b, v) for v in names}
        peak_kind = "max_memory_allocated"
    else:
        del b
        peaks = {v: child_peak(args, v) for v in names}
        peak_kind = "peak RSS of a child process"
    two_fwd = 2 * med["forward"]
    w = max(15, *(len(v) + 2 for v in names))
    print(f"\n{'variant':<{w}}{'median':>12}{'÷ two forwards':>16}{'ref ÷ it':>10}{'peak':>10}"
          f"{'÷ fwd peak':>12}{'randoms/step':>14}{'per direction':>15}")
    for v in names:
        drawn, per_dir = randoms.get(v, (0, 0))
        print(f"{v:<{w}}{med[v] * 1e3:>10.1f}ms{med[v] / two_fwd:>16.2f}{med['reference'] / med[v]:>10.2f}"
              f"{peaks[v] / 2**20:>7.0f}MiB{peaks[v] / peaks['forward']:>12.3f}"
              f"{(f'{drawn / 1e6:.2f}M' if v in randoms else '-'):>14}"
              f"{(f'{per_dir / 1e6:.2f}M' if v in randoms else '-'):>15}")
    print()
    if args.rank and "lowrank" in args.directions:
        print(f"lowrank rank r = {args.rank}")
    for v in steps:
        print(f"{v} step ÷ two forwards:{'':<6}{med[v] / two_fwd:.2f}")
        print(f"MeZO-reference step ÷ {v}:{'':<3}{med['reference'] / med[v]:.2f}")
        print(f"{v} peak ÷ forward peak:{'':<5}{peaks[v] / peaks['forward']:.3f}  ({peak_kind})")
    print(f"reference peak ÷ forward peak:{'':<6}{peaks['reference'] / peaks['forward']:.3f}")
    if args.compile:
        print(f"forward ÷ forward-compiled:{'':<9}{med['forward'] / med['forward-compiled']:.2f}  "
              "(the most compiling the forward could save; the bench's edgezo steps are not compiled)")


if __name__ == "__main__":
    main()
