"""Human-readable rendering of a job's report.json (the JSON itself is the machine contract)."""

from __future__ import annotations

import json
from pathlib import Path

from policies.memory import fmt_bytes


def human_bytes(n: float | None) -> str:
    return fmt_bytes(n, 2)


def load_report(job_dir: Path) -> dict:
    path = Path(job_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{job_dir} has no report.json yet (the job has not finished)")
    return json.loads(path.read_text())


def _metric_line(m: dict | None) -> str:
    if not m:
        return "-"
    keys = [k for k in ("accuracy", "exact_match", "f1", "loss") if k in m]
    parts = []
    for k in keys:
        v = m[k]
        parts.append(f"{k} {v * 100:.1f} %" if k != "loss" else f"loss {v:.4f}")
    return ", ".join(parts) + f"  (n={m.get('n', '?')})"


def accuracy_gain(before: dict | None, after: dict | None) -> dict | None:
    """Final minus zero-shot accuracy, in points, with a 95 % interval paired over the same sentences
    (each sentence's change is −1, 0 or +1; the interval is 1.96 standard errors of their mean)."""
    if not before or not after or "correct" not in before or "correct" not in after:
        return None
    a, b = before["correct"], after["correct"]
    if len(a) != len(b) or not a:
        return None
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / max(1, n - 1)
    half = 1.96 * (var / n) ** 0.5
    return {"points": 100 * mean, "interval95": [100 * (mean - half), 100 * (mean + half)], "n": n,
            "better": d.count(1), "worse": d.count(-1)}


def render(report: dict) -> str:
    lines = [
        f"job        {report.get('name', '?')}  ({report.get('method')}, {report.get('precision')}, model {report.get('model')}"
        + (f", noise {report['noise']})" if report.get("noise") else ")"),
        f"status     {report.get('status')}",
        f"steps      {report.get('steps_done')} / {report.get('steps_total')}",
    ]
    t = report.get("timing") or {}
    if t.get("steps_per_s"):
        lines.append(f"speed      {t['steps_per_s']:.3f} steps/s over {t.get('steps_this_run')} steps, "
                     f"{t.get('wall_s', 0):.1f} s")
    m = report.get("metrics") or {}
    lines.append(f"zero-shot  {_metric_line(m.get('zero_shot'))}")
    lines.append(f"final      {_metric_line(m.get('final'))}")
    g = m.get("gain")
    if g:
        lo, hi = g["interval95"]
        lines.append(f"gain       {g['points']:+.1f} points (95 % interval {lo:+.1f} to {hi:+.1f}, paired over the same "
                     f"{g['n']} sentences: {g['better']} now right, {g['worse']} now wrong)")
    guard = report.get("guard") or {}
    h = guard.get("held_out")
    if h:
        lines.append(f"held-out   {h['n']} train sentences kept out of training, checked {h['checks']} times: "
                     f"{_pct(h['start'])} at the start, {_pct(h['end'])} at the end (the weights after "
                     + ("no step)" if h["end_step"] < 0 else f"step {h['end_step']})"))
    for e in guard.get("events") or []:
        to = "the base weights" if e["to"] < 0 else f"step {e['to']}"
        why = {"held_out": "the held-out score fell", "end": "at the end the last weights showed no gain beyond noise on the held-out sentences, or fell behind an earlier check"}.get(
            e.get("cause"), "the loss had risen")
        lines.append(f"rollback   at step {e['step']} {why}: back to {to}, lr now {e['lr']:.3g}")
    mem = report.get("memory") or {}
    if mem:
        lines.append(f"memory     peak {human_bytes(mem.get('peak_bytes'))} ({mem.get('peak_bytes')} B), "
                     f"avg {human_bytes(mem.get('avg_bytes'))} ({mem.get('avg_bytes')} B)  "
                     f"[meter: {mem.get('meter')}, device {mem.get('device')}]")
        if mem.get("note"):
            lines.append(f"           {mem['note']}")
        phases = mem.get("phases") or {}
        if phases:
            lines.append(f"  {'phase':<12}{'peak':>14}{'average':>14}{'time':>10}")
            for name, ph in phases.items():
                lines.append(f"  {name:<12}{human_bytes(ph.get('peak_bytes')):>14}"
                             f"{human_bytes(ph.get('avg_bytes')):>14}{ph.get('duration_s', 0):>9.1f}s")
    if report.get("error"):
        lines.append(f"error      {report['error']}")
    if report.get("output"):
        lines.append(f"output     {report['output']}")
    if report.get("disk"):
        lines.append(disk_line(report["disk"]))
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f} %"


def disk_line(d: dict) -> str:
    """The job directory's disk use by kind (edgezo.disk.job_disk_use)."""
    n = d.get("snapshots", 0)
    return (f"disk       {human_bytes(d.get('total_bytes'))} in the job directory: output "
            f"{human_bytes(d.get('output_bytes'))}, {n} snapshot{'' if n == 1 else 's'} "
            f"{human_bytes(d.get('snapshot_bytes'))}, seed-log and events {human_bytes(d.get('seedlog_bytes'))}, "
            f"other {human_bytes(d.get('other_bytes'))}")
