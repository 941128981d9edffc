"""The same ZO job in fp32, fp16, bf16 and int8 (+LoRA): peak and average memory, speed, and the floor.

    python bench/precision.py                                   # CPU: OPT-125m shape, batch 4, seq 64
    python bench/precision.py --model opt-350m --steps 1        # CPU, larger (slow on a 2-core machine)
    python bench/precision.py --model opt-1.3b --device cuda --batch 16 --seq 128
    python bench/precision.py --model llama-1b --device cuda --modes fp16-full,int8-lora

Each mode runs in its own child process, through the product's own path (edgezo.trainer.build_engine
on a local model directory, so the int8 base is loaded by bitsandbytes exactly as a job loads it):
load, one warm-up step, then
  floor     peak of a forward-only pass at that precision (two forwards, no perturbation): what
            inference alone needs, the least a ZO step can cost
  peak/avg  peak and time-averaged memory over `--steps` MeZO steps
  steps/s   over the same steps
Memory: on CPU the process RSS (high-water mark reset through /proc/self/clear_refs before each
measurement, VmHWM read after; the average samples /proc/self/statm every 5 ms), so it includes the
Python/torch runtime; on CUDA torch.cuda.max_memory_allocated / memory_allocated (tensors only).
On CPU each child runs with MALLOC_MMAP_THRESHOLD_=1MiB (as the daemon's workers did until they got malloc_trim; large
transient buffers go back to the OS when freed instead of staying in the heap's high-water mark).
Ratios are to the fp16 full-parameter run. The model is built once from the named config with
random weights (speed and memory do not depend on weight values) and cached as fp16 safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {  # name: (precision, trainable)
    "fp32-full": ("fp32", "full"),
    "fp16-full": ("fp16", "full"),
    "bf16-full": ("bf16", "full"),
    "fp16-lora": ("fp16", "lora"),
    "int8-lora": ("int8", "lora"),
    "int8-scales": ("int8", "scales"),
}
REFERENCE = "fp16-full"
SHAPES = {  # OPT: (hidden, layers, heads, ffn); Llama: (hidden, layers, heads, kv heads, ffn, vocab)
    "opt-125m": ("opt", (768, 12, 12, 3072)),
    "opt-350m": ("opt", (1024, 24, 16, 4096)),
    "opt-1.3b": ("opt", (2048, 24, 32, 8192)),
    "opt-2.7b": ("opt", (2560, 32, 32, 10240)),
    "llama-1b": ("llama", (2048, 16, 32, 8, 8192, 128256)),
}


def model_dir(name: str, cache: Path) -> Path:
    """A local HF directory with random weights for the named shape (fp16 safetensors), built once."""
    out = cache / name
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from edgezo.testing.tiny import make_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    family, dims = SHAPES[name]
    if family == "opt":
        hidden, layers, heads, ffn = dims
        cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=hidden,
                        pad_token_id=tok.pad_token_id)
        cls = OPTForCausalLM
    else:
        hidden, layers, heads, kv, ffn, vocab = dims
        cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=ffn, vocab_size=vocab,
                          max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
        cls = LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = cls(cfg).to(torch.float16)
    model.save_pretrained(out)
    return out


# --- one mode, in a child process --------------------------------------------------------------------

class Sampler:
    """Time-averaged memory while running (RSS on CPU, memory_allocated on CUDA)."""

    def __init__(self, read, period: float = 0.005):
        self.read, self.period, self.samples = read, period, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.read())
            time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def mean(self) -> float:
        return sum(self.samples) / max(1, len(self.samples))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def trim() -> None:
    """Give freed heap back to the OS (glibc), so RSS after loading/quantising counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def drop_mapped_pages(directory: Path) -> None:
    """Unmap-from-RSS the resident pages of the model's memory-mapped weight files (madvise DONTNEED).

    transformers keeps the safetensors files mapped while any tensor still views them. After int8
    quantisation the pages of the fp16 weights it read stay resident in that mapping although nothing
    uses them; they are clean page cache the kernel may drop, not memory the job needs. Dropping them
    in every mode alike makes RSS count what is used: pages still in use fault back in on access."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    needle = str(Path(directory).resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(needle) and parts[5].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            libc.madvise(lo, hi - lo, 4)  # MADV_DONTNEED


def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from edgezo.models import decoder_of, head_weight
    from edgezo.spec import load_spec
    from edgezo.trainer import build_engine

    precision, trainable = MODES[args.child]
    import bitsandbytes  # noqa: F401  (the runtime every mode pays, before any model byte)
    import peft  # noqa: F401
    from transformers import OPTForCausalLM  # noqa: F401

    runtime = torch.cuda.memory_allocated() if args.device == "cuda" else rss_bytes()
    spec = load_spec({"model": str(args.model_dir), "precision": precision, "trainable": trainable,
                      "device": args.device, "steps": args.steps + 1, "seed": 0,
                      "optim": {"lr": 1e-7 if trainable == "full" else 1e-4, "eps": 1e-3}})
    engine = build_engine(spec)
    dev = engine.device
    cuda = dev.type == "cuda"
    decoder, head = decoder_of(engine.model), head_weight(engine.model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 30000, (args.batch, args.seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    labels = torch.tensor([i % 2 for i in range(args.batch)], device=dev)
    verb = torch.tensor([1000, 2000], device=dev)

    def loss() -> float:  # the task's shape: last-position logits of the verbalizer rows only
        h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        logits = h.float() @ engine.perturber.rows(head, verb).float().T
        return float(F.cross_entropy(logits, labels))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset_peak() -> None:
        sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak() -> int:
        sync()
        return torch.cuda.max_memory_allocated() if cuda else hwm_bytes()

    current = torch.cuda.memory_allocated if cuda else rss_bytes
    sync()
    if not cuda:
        trim()
        drop_mapped_pages(args.model_dir)
    loaded = current()
    with torch.no_grad():
        engine.method.step(0, loss)  # warm-up: lazy allocations, thread pools, int8 scale setup
        if not cuda:
            trim()
            drop_mapped_pages(args.model_dir)
            loss()  # fault the pages the forward really uses back in
        reset_peak()
        for _ in range(2):
            loss()
        floor = peak()
        reset_peak()
        t0 = time.perf_counter()
        with Sampler(current) as s:
            for step in range(1, args.steps + 1):
                engine.method.step(step, loss)
            sync()
        wall = time.perf_counter() - t0
        step_peak = peak()
    return {"mode": args.child, "trainable_params": sum(p.param.numel() for p in engine.params),
            "runtime": runtime, "loaded": loaded, "floor": floor, "peak": step_peak, "avg": s.mean(), "steps_per_s": args.steps / wall}


def run_child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model-dir", str(args.model_dir), "--device", args.device,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    env = dict(os.environ)
    if args.device == "cpu":  # the threshold the daemon once gave CPU workers (see daemon/supervisor.py, env)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return {"mode": mode, "error": tail or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), help="default: opt-125m on CPU, opt-1.3b on CUDA")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", help=f"comma-separated, from {', '.join(MODES)} (default: all; on CPU all but "
                    "bf16-full, to keep the run under ten minutes)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="measured ZO steps per mode (after one warm-up step)")
    ap.add_argument("--cache", default=os.environ.get("EDGEZO_BENCH_CACHE", "/tmp/edgezo-bench-models"),
                    help="where the random-weight model directories are kept")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args)))
        return

    default = [m for m in MODES if args.device == "cuda" or m != "bf16-full"]
    args.model = args.model or ("opt-1.3b" if args.device == "cuda" else "opt-125m")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else default
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode {bad[0]} (known: {', '.join(MODES)})")
    if REFERENCE not in modes:
        modes.insert(0, REFERENCE)
    import torch

    t0 = time.perf_counter()
    args.model_dir = model_dir(args.model, Path(args.cache))
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()}, max_memory_allocated"
    else:
        where = f"CPU ({os.cpu_count()} cores), peak RSS of a child process"
    print(f"{args.model} shape, random weights, batch {args.batch}, seq {args.seq}, {args.steps} MeZO steps per "
          f"mode after 1 warm-up; {where}; torch {torch.__version__}", flush=True)
    results = []
    for m in modes:
        r = run_child(args, m)
        results.append(r)
        print(f"  {m}: " + ("failed" if "error" in r else f"{r['steps_per_s']:.3f} steps/s"), flush=True)
    ref = next((r for r in results if r["mode"] == REFERENCE and "error" not in r), None)
    mib = 2**20
    print(f"\n{'mode':<12}{'trainable':>11}{'weights':>10}{'floor':>10}{'peak':>10}{'avg':>10}"
          f"{'peak÷fp16':>11}{'net÷fp16':>10}{'steps/s':>9}{'speed÷fp16':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<12}  failed: {r['error'].splitlines()[-1]}")
            continue
        ratio = f"{r['peak'] / ref['peak']:.2f}" if ref else "-"
        net = f"{(r['peak'] - r['runtime']) / (ref['peak'] - ref['runtime']):.2f}" if ref else "-"
        speed = f"{r['steps_per_s'] / ref['steps_per_s']:.2f}" if ref else "-"
        print(f"{r['mode']:<12}{r['trainable_params'] / 1e6:>10.2f}M{r['loaded'] / mib:>7.0f}MiB"
              f"{r['floor'] / mib:>7.0f}MiB{r['peak'] / mib:>7.0f}MiB{r['avg'] / mib:>7.0f}MiB{ratio:>11}{net:>10}"
              f"{r['steps_per_s']:>9.3f}{speed:>12}")
    print("\nweights: memory after loading; floor: peak of forward-only passes (the least a step can need); "
          "peak/avg: over the ZO steps; net: peak minus the runtime measured before the model was built "
          f"(Python, torch, bitsandbytes; 0 on CUDA); ratios to {REFERENCE}. Total {time.perf_counter() - t0:.0f}s.")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": args.device, "batch": args.batch,
                                               "seq": args.seq, "results": results}, indent=2))


if __name__ == "__main__":
    main()
