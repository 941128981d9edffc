"""Does DiZO learn faster than MeZO? Same model, data, seed, batch, lr and eps; one run each.

    python bench/learning.py                     # CPU defaults: ~25 min on 2 idle cores
    python bench/learning.py --steps 2000 --eval-every 100 --eval-size 500 --device cuda

Prints (a) the steps DiZO needs to reach MeZO's final dev accuracy divided by MeZO's steps
(< 1 means DiZO is faster; "never" if it does not get there), (b) both final accuracies, (c) the
wall time per training step of DiZO divided by MeZO's (projection included, eval excluded), and
saves a loss / accuracy-vs-step PNG. Nothing here is tuned to favour either method.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgezo.spec import load_spec  # noqa: E402
from edgezo.trainer import prepare_job_dir, run_job  # noqa: E402

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "edgezo" / "default_spec.yaml"


def job_spec(args, method: str) -> dict:
    sets = [
        f"name=learn-{method}", f"method={method}", f"steps={args.steps}", f"batch_size={args.batch}",
        f"max_length={args.max_length}", f"eval_every={args.eval_every}", f"eval_size={args.eval_size}",
        f"seed={args.seed}", f"optim.lr={args.lr}", f"optim.eps={args.eps}", f"device={args.device}",
        f"trainable={args.trainable}", f"dizo.interval={args.interval}", f"dizo.projection={args.projection}",
        f"dizo.iters={args.iters}", "snapshot_every=0", f"model={args.model}", f"precision={args.precision}",
    ]
    return load_spec(DEFAULT_SPEC, sets)


def curve(report: dict) -> list[tuple[int, float]]:
    return [(h["step"], h["accuracy"]) for h in report["metrics"]["history"]]


def losses(job_dir: Path) -> list[tuple[int, float]]:
    out = []
    for line in (job_dir / "events.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if ev["kind"] == "step":
            out.append((ev["step"], ev["loss"]))
    return out


def seconds_per_step(report: dict) -> float:
    phases = report["memory"]["phases"]
    busy = sum(phases.get(p, {}).get("duration_s", 0.0) for p in ("zo_step", "projection"))
    return busy / max(1, report["timing"]["steps_this_run"])


def steps_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    for step, acc in points:
        if acc >= target:
            return step
    return None


def smooth(xs: list[float], k: int = 25) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(path: Path, runs: dict[str, tuple[list, list]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (loss_pts, acc_pts) in runs.items():
        a.plot([s for s, _ in loss_pts], smooth([v for _, v in loss_pts]), label=name)
        b.plot([s for s, _ in acc_pts], [v * 100 for _, v in acc_pts], marker="o", label=name)
    a.set(xlabel="step", ylabel="training loss (moving average of 25)", title="loss")
    b.set(xlabel="step", ylabel="dev accuracy (%)", title="dev accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--trainable", default="full")
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument("--projection", default="zo", choices=["zo", "fo"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="directory for the two job dirs and the PNG")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="edgezo-learning-"))
    out.mkdir(parents=True, exist_ok=True)
    reports, runs = {}, {}
    for method in ("mezo", "dizo"):
        job = prepare_job_dir(out / method, job_spec(args, method))
        print(f"running {method} in {job} ...", file=sys.stderr, flush=True)
        reports[method] = run_job(job, progress=True)
        runs[method] = (losses(job), curve(reports[method]))

    mezo_final = reports["mezo"]["metrics"]["final"]["accuracy"]
    dizo_final = reports["dizo"]["metrics"]["final"]["accuracy"]
    mezo_pts, dizo_pts = runs["mezo"][1], runs["dizo"][1]  # the history ends with the final eval
    zs = reports["mezo"]["metrics"]["zero_shot"]["accuracy"]
    reach = steps_to_reach([p for p in dizo_pts if p[0] > 0], mezo_final)
    png = out / "learning.png"
    plot(png, {m: (runs[m][0], pts) for m, pts in (("mezo", mezo_pts), ("dizo", dizo_pts))})

    print(f"\nmodel {args.model}, {args.precision}, trainable {args.trainable}, {args.steps} steps, batch {args.batch}, "
          f"lr {args.lr}, eps {args.eps}, seed {args.seed}; DiZO {args.projection} every {args.interval} steps, "
          f"{args.iters} iters; dev {args.eval_size} sentences")
    print(f"zero-shot dev accuracy:            {zs * 100:.1f} %")
    print(f"(b) final dev accuracy  MeZO {mezo_final * 100:.1f} %   DiZO {dizo_final * 100:.1f} %")
    if mezo_final <= zs:
        print("    note: MeZO's final accuracy is not above zero-shot, so (a) measures no learning; run longer")
    if reach is None:
        print(f"(a) DiZO steps to MeZO's final accuracy ÷ MeZO steps: never within {args.steps} steps")
    else:
        print(f"(a) DiZO steps to MeZO's final accuracy ÷ MeZO steps: {reach} / {args.steps} = {reach / args.steps:.2f}")
    ratio = seconds_per_step(reports["dizo"]) / seconds_per_step(reports["mezo"])
    ph = reports["dizo"]["memory"]["phases"]
    within = (ph["zo_step"]["duration_s"] + ph.get("projection", {}).get("duration_s", 0.0)) / ph["zo_step"]["duration_s"]
    print(f"(c) wall time per step, DiZO ÷ MeZO: {ratio:.3f} across the two runs; "
          f"{within:.3f} within the DiZO run ((ZO steps + projections) ÷ ZO steps, immune to machine drift)")
    print("dev accuracy by step:")
    for (s1, a1), (_, a2) in zip(mezo_pts, dizo_pts):
        print(f"  step {s1:>6}:  MeZO {a1 * 100:5.1f} %   DiZO {a2 * 100:5.1f} %")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
