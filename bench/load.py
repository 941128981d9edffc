"""The daemon under load: N concurrent status clients plus enqueues while 3 jobs run.

    python bench/load.py [--clients 500] [--seconds 20] [--real]

Starts a daemon on a temp socket and state dir, enqueues 3 long jobs (synthetic workers by default:
each step is fsynced and reported to the daemon, so a slow daemon slows them; --real: tiny-model
trainer workers), and measures their steps/s twice in the same run: alone (the baseline) and while
`--clients` threads each ask GET /jobs (what `edgezo status` asks) in a loop on their own connection,
and one more enqueues a short job every 0.5 s. Prints the latency p50/p99, failed requests, the
daemon's peak RSS and the jobs' slowdown as a ratio against the baseline. Goals (issue 12): 0 failed
requests at 500 clients, slowdown <= 10 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgezo.client import Client  # noqa: E402
from edgezo.testing.daemon import DaemonProc, synthetic_spec, wait_for  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def steps_per_s(d: DaemonProc, jobs: list[str], seconds: float) -> float:
    """The 3 jobs' summed step rate over `seconds`, from their step counts before and after."""
    c = d.client()
    before = {j: c.job(j)["step"] for j in jobs}
    t0 = time.monotonic()
    time.sleep(seconds)
    after = {j: c.job(j)["step"] for j in jobs}
    return sum(after[j] - before[j] for j in jobs) / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the baseline and of the load window")
    ap.add_argument("--real", action="store_true", help="tiny-model trainer workers instead of synthetic ones")
    args = ap.parse_args()

    d = DaemonProc(None, engine=None if args.real else "synthetic", budget="8GiB",
                   synthetic="step_s=0.02,heavy_every=1000000,heavy_s=0.01")
    d.env["EDGEZO_HEARTBEAT_S"] = "2"
    try:
        d.start()
        daemon = psutil.Process(d.proc.pid)
        jobs = [d.enqueue(synthetic_spec(f"load{i}", steps=10**8))["id"] for i in range(3)]
        wait_for(lambda: all(d.job(j)["state"] == "running" and d.job(j)["step"] > 5 for j in jobs), 120,
                 what="3 jobs running")
        base = steps_per_s(d, jobs, args.seconds)

        stop = threading.Event()
        latencies: list[float] = []
        failures: list[str] = []
        enqueued = [0]
        lock = threading.Lock()

        def status_client() -> None:
            client = Client(d.socket, timeout=30)
            mine, bad = [], []
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    client.jobs()
                    mine.append(time.perf_counter() - t)
                except Exception as e:  # every failure counts; the loop goes on like a user's retry
                    bad.append(f"{type(e).__name__}: {e}")
            client.close()
            with lock:
                latencies.extend(mine)
                failures.extend(bad)

        def enqueuer() -> None:
            client = Client(d.socket, timeout=30)
            i = 0
            while not stop.wait(0.5):
                try:
                    job = client.enqueue(synthetic_spec(f"burst{i}", steps=5))
                    client.cancel(job["id"])  # queued behind the 3 long jobs: it would only wait
                    enqueued[0] += 1
                except Exception as e:
                    with lock:
                        failures.append(f"enqueue {type(e).__name__}: {e}")
                i += 1
            client.close()

        threads = [threading.Thread(target=status_client, daemon=True) for _ in range(args.clients)]
        threads.append(threading.Thread(target=enqueuer, daemon=True))
        rss_peak = daemon.memory_info().rss
        for t in threads:
            t.start()
        loaded = steps_per_s(d, jobs, args.seconds)
        rss_peak = max(rss_peak, daemon.memory_info().rss)
        stop.set()
        for t in threads:
            t.join(60)
        alive = d.proc.poll() is None and d.client().health()["ok"]
        result = {
            "clients": args.clients,
            "workers": "trainer (tiny model)" if args.real else "synthetic",
            "requests": len(latencies),
            "failed_requests": len(failures),
            "first_failures": sorted(set(failures))[:3],
            "enqueues": enqueued[0],
            "status_p50_ms": round(pct(latencies, 0.50) * 1e3, 1),
            "status_p99_ms": round(pct(latencies, 0.99) * 1e3, 1),
            "daemon_rss_mib": round(rss_peak / 2**20, 1),
            "jobs_steps_per_s_alone": round(base, 2),
            "jobs_steps_per_s_under_load": round(loaded, 2),
            "slowdown": round(1 - loaded / base, 3) if base else None,
            "daemon_alive": alive,
        }
        print(json.dumps(result, indent=2))
        return 0 if alive and not failures else 1
    finally:
        d.cleanup()


if __name__ == "__main__":
    sys.exit(main())
