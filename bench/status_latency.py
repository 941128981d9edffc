"""Status-query latency of the daemon with 3 jobs running, and the daemon's RSS.

    python bench/status_latency.py [--real] [--requests 500]

Starts a daemon on a temp socket/state dir, enqueues 3 long jobs (synthetic workers by default;
--real: tiny-model trainer workers, which keep both CPU cores busy), waits until all 3 run, then
times GET /jobs (what `edgezo status` asks) over one keep-alive connection, and the whole
`edgezo status` command (interpreter start included). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgezo.testing.daemon import DaemonProc, wait_for  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="tiny-model trainer workers instead of synthetic ones")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--cli-runs", type=int, default=10)
    args = ap.parse_args()

    d = DaemonProc(None, engine=None if args.real else "synthetic", budget="8GiB",
                   synthetic="step_s=0.05,heavy_every=20,heavy_bytes=32MiB,heavy_s=0.2")
    try:
        d.start()
        if args.real:
            from edgezo.testing.tiny import make_model_dir, tiny_spec

            tmp = Path(tempfile.mkdtemp(prefix="ezb"))
            model = make_model_dir(tmp / "model")
            specs = [tiny_spec(model, tmp / "data", steps=100000, eval_every=50) for _ in range(3)]
        else:
            specs = [{"name": "bench", "steps": 100000} for _ in range(3)]
        ids = [d.enqueue(s)["id"] for s in specs]
        wait_for(lambda: all(d.job(i)["state"] == "running" and d.job(i)["step"] > 0 for i in ids), 120,
                 what="3 jobs running")
        c = d.client()
        c.jobs()
        lat = []
        for _ in range(args.requests):
            t = time.perf_counter()
            listing = c.jobs()
            lat.append((time.perf_counter() - t) * 1000)
        assert sum(j["state"] == "running" for j in listing["jobs"]) == 3
        cli = []
        for _ in range(args.cli_runs):
            t = time.perf_counter()
            r = d.cli("status")
            cli.append((time.perf_counter() - t) * 1000)
            assert r.returncode == 0
        health = c.health()
        out = {
            "workers": "trainer (tiny model)" if args.real else "synthetic",
            "jobs_running": 3,
            "requests": args.requests,
            "status_query_ms": {"p50": round(pct(lat, 0.5), 3), "p99": round(pct(lat, 0.99), 3),
                                "mean": round(statistics.mean(lat), 3), "max": round(max(lat), 3)},
            "edgezo_status_cli_ms": {"p50": round(pct(cli, 0.5), 1), "max": round(max(cli), 1)},
            "daemon_rss_mib": round(health["rss_bytes"] / 2**20, 1),
            "daemon_torch_loaded": health["torch_loaded"],
        }
        print(json.dumps(out, indent=2))
        for i in ids:
            c.cancel(i)
        c.close()
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
