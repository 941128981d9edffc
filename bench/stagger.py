"""Staggering benchmark: N DiZO-FO jobs through one daemon under a budget smaller than their heavy peaks.

    python bench/stagger.py [--jobs 3] [--steps 12] [--interval 4] [--iters 3] [--device cpu|cuda]
                            [--budget auto|SIZE] [--modes leases,no-leases] [--json OUT.json]

What it does:
1. Builds a local HF model from a Llama config with random weights and eager attention (so the FO
   projection's backward keeps every layer's [batch, heads, seq, seq] attention probabilities: a
   heavy phase several hundred MiB above the steady ZO footprint at a small compute cost), with the
   tiny BPE tokenizer of edgezo/testing/tiny.py, and long synthetic reviews (every example fills max_length).
2. Calibrates: one job alone through a daemon with a generous budget. Its wall time x N is the
   sequential makespan; its report (memory.phases) gives the steady (zo_step) and heavy
   (projection) peaks. Budget (auto) = N x steady + 1.5 x (projection - steady): N steady jobs plus
   one projection fit, two projections at once do not.
3. Runs the N jobs at once through a daemon with that budget, with leases and with `--no-leases`.
   While they run, a sampler sums the RSS of the daemon's worker processes (their children
   included) every 20 ms; on CUDA the device figure is NVML's used memory.

Prints a table per mode and one machine-readable line `STAGGER_JSON {...}` (also --json FILE).
With STAGGER_DUMP=DIR in the environment, each job's daemon events (leases, pauses) go to DIR too.
CPU: the "device" is system memory and the budget applies to the sum of the workers' RSS (what
the daemon meters). Workers run with MALLOC_MMAP_THRESHOLD_ so freed activations go back to the OS
(otherwise glibc keeps a heavy phase's pages and RSS never drops; see the printed note).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from edgezo.protocol import FINAL  # noqa: E402
from edgezo.testing.daemon import DaemonProc, wait_for  # noqa: E402

MiB = 2**20


def fmt(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / MiB:,.0f} MiB"


# ------------------------------------------------------------------------------ model and data
def build_model(out: Path, *, hidden: int, heads: int, kv_heads: int, inter: int, layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgezo.testing.tiny import make_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    conf = json.loads((out / "config.json").read_text())
    conf["attn_implementation"] = "eager"  # materialised attention probabilities: the heavy phase's bulk
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    return out


def write_long_reviews(path: Path, n: int, sentences: int, seed: int) -> Path:
    from edgezo.testing.tiny import review

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            label = "fresh" if i % 2 == 0 else "rotten"
            f.write(json.dumps({"text": " ".join(review(rng, label) for _ in range(sentences)), "label": label}) + "\n")
    return path


def job_spec(name: str, model: Path, data: Path, a: argparse.Namespace) -> dict:
    return {
        "name": name,
        "model": str(model),
        "precision": "fp32",
        "trainable": "full",
        "method": "dizo",
        "optim": {"lr": 1e-4, "eps": 1e-3},
        "dizo": {"interval": a.interval, "projection": "fo", "iters": a.iters, "fo_lr": 0.01, "clip": 0.2,
                 "layers": ["q_proj", "v_proj"]},
        "task": {"type": "classification", "train": str(data / "train.jsonl"), "eval": str(data / "dev.jsonl"),
                 "text_field": "text", "label_field": "label", "template": "Review: {text}\nSentiment:",
                 "labels": {"rotten": " negative", "fresh": " positive"}},
        "steps": a.steps,
        "batch_size": a.batch,
        "max_length": a.seq,
        "eval_every": 0,
        "eval_size": a.batch,
        "snapshot_every": 0,
        "seed": 0,
        "device": a.device,
    }


# ------------------------------------------------------------------------------ measuring
class Sampler:
    """Sum of the daemon's workers' RSS (each with its children) every `interval` s; NVML on CUDA."""

    def __init__(self, daemon_pid: int, interval: float = 0.02, cuda: bool = False):
        self.root = psutil.Process(daemon_pid)
        self.interval, self.cuda = interval, cuda
        self.samples: list[tuple[float, int]] = []
        self.per_pid: dict[int, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stagger-sampler", daemon=True)
        self._nvml = None
        if cuda:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        procs: list[psutil.Process] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.time()
            if now - refreshed > 0.25:
                try:
                    procs = self.root.children(recursive=True)
                except psutil.Error:
                    procs = []
                refreshed = now
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.per_pid.setdefault(p.pid, []).append((now, rss))
            if self._nvml is not None:
                total = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.samples.append((now, total))
            self._stop.wait(self.interval)

    def over(self, budget: int) -> dict:
        peak = max((b for _, b in self.samples), default=0)
        secs = sum(t1 - t0 for (t0, b), (t1, _) in zip(self.samples, self.samples[1:]) if b > budget)
        return {"peak_bytes": peak, "over_budget_s": round(secs, 2),
                "samples": len(self.samples), "over_samples": sum(b > budget for _, b in self.samples)}


def peak_avg(series: list[tuple[float, int]]) -> tuple[int, int]:
    if not series:
        return 0, 0
    area = sum(b0 * (t1 - t0) for (t0, b0), (t1, _) in zip(series, series[1:]))
    dur = series[-1][0] - series[0][0]
    return max(b for _, b in series), int(area / dur) if dur > 0 else series[0][1]


def job_events(d: DaemonProc, job_id: str) -> list[dict]:
    try:
        return d.events(job_id)
    except Exception:
        return []


def run_mode(a: argparse.Namespace, model: Path, data: Path, *, n: int, budget: int, leases: bool,
             env: dict, label: str) -> dict:
    extra = [] if leases else ["--no-leases"]
    if a.device == "cpu":
        extra.append("--system-memory")
    d = DaemonProc(None, *extra, engine=None, budget=str(budget), env=env)
    try:
        d.start()
        sampler = Sampler(d.proc.pid, cuda=a.device == "cuda").start()
        t0 = time.time()
        ids = [d.enqueue(job_spec(f"stagger{i}", model, data, a))["id"] for i in range(n)]
        wait_for(lambda: all(d.job(i)["state"] in FINAL for i in ids), a.timeout, interval=0.5,
                 what=f"{label}: all jobs finished")
        makespan = time.time() - t0
        device = d.client().request("GET", "/device")
        sampler.stop()
        jobs = []
        for i in ids:
            view = d.job(i)
            job_dir = d.state_dir / "jobs" / i
            report = {}
            r = d.cli("report", i, "--json")
            if r.returncode == 0:
                report = json.loads(r.stdout)
            evs = job_events(d, i)
            if os.environ.get("STAGGER_DUMP"):
                Path(os.environ["STAGGER_DUMP"], f"{label}-{i}.json").write_text(json.dumps(evs, indent=1))
            kinds = [e.get("kind") for e in evs]
            local = [json.loads(x) for x in (job_dir / "events.jsonl").read_text().splitlines()
                     ] if (job_dir / "events.jsonl").exists() else []
            projections = sum(1 for e in local if e.get("kind") == "projection")
            failure = json.loads((job_dir / "failure.json").read_text()) if (job_dir / "failure.json").exists() else None
            mem = report.get("memory") or {}
            phases = mem.get("phases") or {}
            pids = {e.get("data", {}).get("pid") for e in evs if e.get("kind") == "worker"}
            series = sorted(s for pid in pids if pid in sampler.per_pid for s in sampler.per_pid[pid])
            bench_peak, bench_avg = peak_avg(series)
            granted = [e.get("data", {}) for e in evs if e.get("kind") == "lease-granted"
                       and e.get("data", {}).get("phase") == "projection"]
            jobs.append({
                "id": i, "state": view["state"], "failure": failure, "error": view.get("error"),
                "projections": projections, "projections_expected": a.steps // a.interval,
                "pauses": kinds.count("pause"), "attempts": view.get("attempts"),
                "pause_reasons": [e.get("data", {}).get("reason") for e in evs if e.get("kind") == "pause"],
                "peak_bytes": mem.get("peak_bytes"), "avg_bytes": mem.get("avg_bytes"), "meter": mem.get("meter"),
                "projection_peak_bytes": (phases.get("projection") or {}).get("peak_bytes"),
                "zo_step_avg_bytes": (phases.get("zo_step") or {}).get("avg_bytes"), "phases": {k: {x: v.get(x) for x in ("peak_bytes", "avg_bytes", "duration_s")}
                                                                       for k, v in phases.items()},
                "daemon_peak_bytes": (mem.get("daemon") or {}).get("peak_bytes"),
                "daemon_avg_bytes": (mem.get("daemon") or {}).get("avg_bytes"),
                "bench_peak_bytes": bench_peak, "bench_avg_bytes": bench_avg,
                "lease_bytes": max((g.get("bytes", 0) for g in granted), default=None),
                "lease_wait_s": round(sum(g.get("waited_s", 0) for g in granted), 2),
            })
        over = sampler.over(budget)
        oom = sum(1 for j in jobs if (j["failure"] or {}).get("type") in ("cuda_oom", "oom"))
        return {
            "mode": label, "leases": leases, "budget_bytes": budget, "makespan_s": round(makespan, 1),
            "device_peak_bytes": over["peak_bytes"], "over_budget_s": over["over_budget_s"],
            "over_budget_samples": over["over_samples"], "samples": over["samples"],
            "daemon_device": {k: device.get(k) for k in ("source", "budget_applies_to", "budget_bytes")},
            "daemon_job_peak_sum_bytes": sum(j["daemon_peak_bytes"] or 0 for j in jobs),
            "ooms": oom, "failed": sum(j["state"] != "done" for j in jobs),
            "pauses": sum(j["pauses"] for j in jobs),
            "all_projections_ran": all(j["projections"] == j["projections_expected"] for j in jobs),
            "jobs": jobs,
        }
    finally:
        d.cleanup()


def calibrate(a: argparse.Namespace, model: Path, data: Path, env: dict) -> dict:
    """One job alone (generous budget): sequential reference time and its steady/heavy peaks."""
    res = run_mode(a, model, data, n=1, budget=64 * 2**30, leases=True, env=env, label="alone")
    j = res["jobs"][0]
    if j["state"] != "done":
        raise SystemExit(f"calibration job failed: {j['failure'] or j['error']}")
    zo = (j["phases"].get("zo_step") or {})
    return {"wall_s": res["makespan_s"], "steady_bytes": zo.get("avg_bytes") or 0,
            "zo_peak_bytes": zo.get("peak_bytes") or 0,
            "projection_peak_bytes": j["projection_peak_bytes"] or 0, "job": j}


def pick_budget(n: int, cal: dict) -> int:
    """One projection fits as the daemon counts it, two at once do not.

    The daemon commits every running job at its ZO-step peak (a job waiting for a lease keeps stepping,
    so it may climb back there) and a lease on top; the budget is that plus a 15 % margin of the
    projection's extra memory. Counting one job at its ZO-step average instead (as this did before)
    left all N jobs waiting at once for their last projection (no steps left to overlap) a few MiB
    short: a lease deadlock to the daemon, which paused one of them."""
    zo_avg, zo_peak, proj = cal["steady_bytes"], cal["zo_peak_bytes"], cal["projection_peak_bytes"]
    delta = max(proj - zo_avg, 0)  # what a projection adds over the steady level
    lease = cal["job"]["lease_bytes"] or delta
    return int(n * zo_peak + max(lease, delta) + 0.15 * delta)


# ------------------------------------------------------------------------------ output
def table(res: dict, seq_makespan: float) -> str:
    lines = []
    b = res["budget_bytes"]
    over = res["device_peak_bytes"] > b
    lines.append(f"== {res['mode']}: {len(res['jobs'])} DiZO-FO jobs, budget {fmt(b)}")
    lines.append(f"device peak {fmt(res['device_peak_bytes'])} vs budget {fmt(b)}"
                 f"  ({'OVER by ' + fmt(res['device_peak_bytes'] - b) if over else 'within'};"
                 f" {res['over_budget_s']} s over budget, {res['over_budget_samples']}/{res['samples']} samples)")
    lines.append(f"OOMs {res['ooms']}, failed jobs {res['failed']}, pauses {res['pauses']},"
                 f" every projection ran: {res['all_projections_ran']}")
    lines.append(f"makespan {res['makespan_s']} s / sequential {seq_makespan:.1f} s = "
                 f"{res['makespan_s'] / seq_makespan:.2f}")
    hdr = (f"{'JOB':<10} {'STATE':<7} {'PROJ':>5} {'PEAK':>10} {'AVG':>10} {'PROJ PEAK':>10} "
           f"{'DAEMON PK':>10} {'DAEMON AVG':>10} {'BENCH PK':>10} {'BENCH AVG':>10} {'LEASE':>9} {'WAITED':>7}")
    lines.append(hdr)
    for j in res["jobs"]:
        lines.append(f"{j['id']:<10} {j['state']:<7} {j['projections']:>2}/{j['projections_expected']:<2} "
                     f"{fmt(j['peak_bytes']):>10} {fmt(j['avg_bytes']):>10} {fmt(j['projection_peak_bytes']):>10} "
                     f"{fmt(j['daemon_peak_bytes']):>10} {fmt(j['daemon_avg_bytes']):>10} "
                     f"{fmt(j['bench_peak_bytes']):>10} {fmt(j['bench_avg_bytes']):>10} "
                     f"{fmt(j['lease_bytes']):>9} {j['lease_wait_s']:>6}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--interval", type=int, default=8, help="dizo.interval: a projection every N steps")
    ap.add_argument("--iters", type=int, default=1, help="dizo.iters: Adam iterations per projection")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--budget", default="auto", help="auto, or a size (e.g. 1.6GiB)")
    ap.add_argument("--modes", default="leases,no-leases")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker (default: cores // jobs, at least 1; the calibration job too)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--workdir", help="where the model, data and state go (default: a temp dir)")
    ap.add_argument("--json", help="also write the machine-readable result here")
    a = ap.parse_args(argv)
    if a.jobs < 1 or a.steps < a.interval:
        ap.error("need --jobs >= 1 and --steps >= --interval")

    from edgezo.spec import parse_size

    work = Path(a.workdir or tempfile.mkdtemp(prefix="ezstagger"))
    t_build = time.time()
    model = build_model(work / "model", hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, inter=a.inter,
                        layers=a.layers)
    data = work / "data"
    write_long_reviews(data / "train.jsonl", 256, sentences=max(4, a.seq // 6), seed=0)
    write_long_reviews(data / "dev.jsonl", max(a.batch, 16), sentences=max(4, a.seq // 6), seed=1)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(2**20)), "HF_HUB_OFFLINE": "1"}
    print(f"model: Llama {a.layers} layers, hidden {a.hidden}, {a.heads} heads ({a.kv_heads} kv), "
          f"inter {a.inter}, eager attention; batch {a.batch} x seq {a.seq}; {a.steps} steps, projection every "
          f"{a.interval} (FO, {a.iters} Adam iters); {a.jobs} jobs, {threads} torch thread(s) each; device {a.device}"
          f"  [built in {time.time() - t_build:.1f} s]", flush=True)

    cal = calibrate(a, model, data, env)
    steady, heavy = cal["steady_bytes"], cal["projection_peak_bytes"]
    budget = pick_budget(a.jobs, cal) if a.budget == "auto" else parse_size(a.budget, "--budget")
    seq_makespan = a.jobs * cal["wall_s"]
    delta = heavy - steady
    print(f"alone: {cal['wall_s']} s wall; zo_step avg {fmt(steady)} (peak {fmt(cal['zo_peak_bytes'])}), "
          f"projection peak {fmt(heavy)} (+{fmt(delta)}); projection lease asked {fmt(cal['job']['lease_bytes'])}",
          flush=True)
    two = (a.jobs - 2) * steady + 2 * heavy
    print(f"budget {fmt(budget)}: {a.jobs} jobs with one projection ~{fmt((a.jobs - 1) * steady + heavy)}, "
          f"with two ~{fmt(two)}, sum of heavy-phase peaks {fmt(a.jobs * heavy)}; "
          f"sequential makespan {a.jobs} x {cal['wall_s']} s = {seq_makespan:.1f} s", flush=True)
    if a.jobs >= 2 and two <= budget:
        print("warning: two projections at once fit in this budget; the comparison shows little", flush=True)
    out = {"config": {k: v for k, v in vars(a).items() if k != "json"}, "threads": threads,
           "calibration": cal, "budget_bytes": budget, "sequential_makespan_s": seq_makespan, "modes": {}}
    for mode in [m.strip() for m in a.modes.split(",") if m.strip()]:
        if mode not in ("leases", "no-leases"):
            ap.error(f"--modes: unknown mode {mode!r}")
        res = run_mode(a, model, data, n=a.jobs, budget=budget, leases=mode == "leases", env=env, label=mode)
        res["makespan_ratio"] = round(res["makespan_s"] / seq_makespan, 3)
        out["modes"][mode] = res
        print(table(res, seq_makespan), flush=True)
    print("notes: PEAK/AVG = the worker's own meter (report.json, RSS on CPU); DAEMON = the daemon's samples; "
          "BENCH = this script's 20 ms RSS samples; LEASE = projection lease asked; WAITED = total wait for it.\n"
          "PROJ = projections run / due: the trainer keeps one 'projection due' flag, so a projection deferred for\n"
          "more than --interval steps merges with the next one (fewer than due; keep the interval longer than N\n"
          "projections take).")
    line = json.dumps(out, default=str)
    print("STAGGER_JSON " + line)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
