"""The PNGs a report promises: a job's memory timeline and its loss/accuracy curves.

Both can be drawn from the job directory alone (the worker's `memory.jsonl` and the trainer's
`events.jsonl`), so a finished job plots without a daemon; the memory plot also takes the daemon's
own samples (with the device budget) when one answers. matplotlib is imported only here, and only
when a plot is drawn, so the CLI's client commands stay light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgezo.memory import read_memory_log

GAP_S = 10.0  # no reading for this long: the job was not running (paused, resumed later); the line breaks
PALETTE = ["#cfe8ff", "#ffe1c4", "#d9f2d0", "#f3d1f4", "#fff3b0", "#e0e0e0"]
LINE = "#1f4e79"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def job_dir_timeline(job_dir: Path) -> dict[str, Any]:
    """The memory timeline of a job directory, in the shape the daemon's GET /jobs/{id}/memory answers."""
    rows = read_memory_log(job_dir)
    return {"job": Path(job_dir).name, "budget_bytes": None, "device": [],
            "samples": [{"ts": r["t"], "bytes": r["bytes"], "phase": r.get("phase") or ""} for r in rows],
            "source": rows[-1].get("source") if rows else None}


def plot_memory(timeline: dict, png: str | Path) -> int:
    """The job's memory over time, phases shaded, the device budget as a line; returns how many
    samples were drawn."""
    plt = _pyplot()
    samples = timeline.get("samples") or []
    fig, ax = plt.subplots(figsize=(9, 4))
    if samples:
        t0 = samples[0]["ts"]
        xs = [s["ts"] - t0 for s in samples]
        colours: dict[str, str] = {}
        start = 0
        for i in range(1, len(samples) + 1):
            if i == len(samples) or samples[i]["phase"] != samples[start]["phase"]:
                phase = samples[start]["phase"] or "(none)"
                colour = colours.setdefault(phase, PALETTE[len(colours) % len(PALETTE)])
                end = xs[i] if i < len(samples) else xs[-1]
                ax.axvspan(xs[start], end, color=colour, alpha=0.8, lw=0,
                           label=phase if phase not in ax.get_legend_handles_labels()[1] else None)
                start = i
        line_x, line_y = [], []
        for i, (x, s) in enumerate(zip(xs, samples)):
            if i and x - xs[i - 1] > GAP_S:
                line_x.append(float("nan"))
                line_y.append(float("nan"))
            line_x.append(x)
            line_y.append(s["bytes"] / 2**20)
        source = f" ({timeline['source']})" if timeline.get("source") else ""
        ax.plot(line_x, line_y, color=LINE, lw=1.5, label=f"job memory{source}")
        dev = timeline.get("device") or []
        if dev:
            ax.plot([d["ts"] - t0 for d in dev], [d["usage"] / 2**20 for d in dev], color="#888", lw=1, ls=":",
                    label="all jobs (budgeted usage)")
    budget = timeline.get("budget_bytes")
    if budget:
        ax.axhline(budget / 2**20, color="#c00000", ls="--", lw=1.2, label="budget")
    top = max([s["bytes"] for s in samples] + [budget or 0] + [d["usage"] or 0 for d in timeline.get("device") or []])
    ax.set_ylim(0, 1.12 * top / 2**20 or 1)  # from zero: the steady state's size, not just its wiggles
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("MiB")
    ax.set_title(f"memory of {timeline.get('job')}")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right", fontsize=8)  # memory is drawn from zero: the bottom is free
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return len(samples)


def training_history(job_dir: Path) -> tuple[list[tuple[int, float]], list[dict]]:
    """(step, loss) of every step and the evaluations ({"step", "tag", "metrics"}) from events.jsonl."""
    path = Path(job_dir) / "events.jsonl"
    losses: list[tuple[int, float]] = []
    evals: list[dict] = []
    try:
        text = path.read_text()
    except OSError:  # none yet, or a system daemon's job this user may not read
        return losses, evals
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a torn last line
        if ev.get("kind") == "step" and isinstance(ev.get("loss"), (int, float)):
            losses.append((int(ev.get("step", 0)) + 1, float(ev["loss"])))
        elif ev.get("kind") == "eval" and isinstance(ev.get("metrics"), dict):
            evals.append(ev)
    return losses, evals


def _score(metrics: dict) -> tuple[str, float] | None:
    for key in ("accuracy", "f1", "exact_match"):
        if isinstance(metrics.get(key), (int, float)):
            return key, float(metrics[key])
    return None


def plot_training(job_dir: Path, png: str | Path) -> str | None:
    """Training loss per step (and its moving average) over the evaluations' accuracy (or F1);
    returns what it drew, or None (and no file) when the job has neither."""
    losses, evals = training_history(job_dir)
    scored = [(int(e.get("step", 0)), e.get("tag", ""), s) for e in evals if (s := _score(e["metrics"]))]
    if not losses and not scored:
        return None
    plt = _pyplot()
    rows = 2 if losses and scored else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 3.2 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, color="#9db4cc", lw=0.8, label="loss")
        w = max(1, len(values) // 20)
        if w > 1:
            smooth = [sum(values[max(0, i - w + 1): i + 1]) / len(values[max(0, i - w + 1): i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, color=LINE, lw=1.6, label=f"moving average ({w} steps)")
        ax.set_ylabel("training loss")
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[-1][0]
    if scored:
        name = scored[0][2][0]
        xs = [s for s, _, _ in scored]
        ys = [100 * v for _, _, (_, v) in scored]
        ax.plot(xs, ys, marker="o", color="#2e7d32", lw=1.4)
        for x, tag, (_, v) in scored:
            if tag in ("zero_shot", "final"):
                ax.annotate(f"{tag.replace('_', '-')} {100 * v:.1f}", (x, 100 * v), textcoords="offset points",
                            xytext=(4, 6) if tag == "zero_shot" else (-4, 6), fontsize=8,
                            ha="left" if tag == "zero_shot" else "right")
        ax.set_ylabel(f"eval {name} (%)")
    ax.set_xlabel("step")
    axes[0][0].set_title(f"training of {Path(job_dir).name}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    drawn = ["training loss"] if losses else []
    if scored:
        drawn.append(f"eval {scored[0][2][0]}")
    return " and ".join(drawn)


def training_png_for(memory_png: str | Path) -> Path:
    """Where `--plot out.png` puts the loss/accuracy chart: beside it, as out-training.png."""
    p = Path(memory_png)
    return p.with_name(f"{p.stem}-training{p.suffix or '.png'}")


def plot_job(job_dir: Path, memory_png: str | Path, training_png: str | Path | None = None,
             timeline: dict | None = None) -> list[tuple[Path, str]]:
    """Both plots of a job: memory from `timeline` (the daemon's samples) or else the job directory's,
    loss/accuracy from its events (to `training_png`, by default beside the memory plot, when it has
    any); returns (path, what) for each PNG written."""
    written: list[tuple[Path, str]] = []
    timeline = timeline if timeline is not None else job_dir_timeline(job_dir)
    n = plot_memory(timeline, memory_png)
    written.append((Path(memory_png), f"memory timeline, {n} samples"))
    training = Path(training_png) if training_png else training_png_for(memory_png)
    drawn = plot_training(job_dir, training)
    if drawn:
        written.append((training, drawn))
    return written
