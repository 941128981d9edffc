"""The daemon's CLI commands: daemon, enqueue, status, cancel, logs, and `report` for daemon jobs.

Each command takes the argparse Namespace and returns an exit code. The client commands import
only the socket client (no torch, no transformers), so they answer in a fraction of a second.
`python -m edgezo.daemon_cli COMMAND ...` runs them without the main `edgezo` entry point.
One module for the commands that talk to a daemon (each short), with their shared rendering.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgezo.client import ApiError, Client, DaemonNotRunning, DaemonUnresponsive, system_socket, user_socket
from edgezo.protocol import Control, JobState
from policies.memory import fmt_bytes


def _fail(msg: str, code: int = 1) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _client(args) -> Client:
    return Client(getattr(args, "socket", None))


class CliError(Exception):
    """A failure said in one line, with its exit code (2: the request was wrong)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _guard(fn):
    """Turn 'no daemon' and API errors into one clear line and an exit code."""

    def wrapped(args) -> int:
        try:
            return fn(args)
        except CliError as e:
            return _fail(str(e), e.code)
        except DaemonNotRunning as e:
            return _fail(str(e), 3)
        except ApiError as e:
            body = e.body if isinstance(e.body, dict) else {}
            return _fail(body.get("error") or str(e), 2 if e.status in (400, 404, 409, 422) else 1)
        except KeyboardInterrupt:
            return 130

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _state_dir(state_dir: str | None, error: DaemonNotRunning):
    """No daemon answers: the state directory to read instead (`daemon.views.StateDir`), saying so.
    A daemon that is there but stalled is not absent: its error stands, as it does with no store."""
    if isinstance(error, DaemonUnresponsive):
        raise error
    from daemon.store import StoreCorrupt
    from daemon.views import StateDir, find_state_dir

    path = find_state_dir(state_dir)
    if path is None:
        raise error
    print(f"(no daemon running; read from {path})", file=sys.stderr)
    try:
        return StateDir(path)
    except StoreCorrupt as e:
        raise CliError(str(e)) from None


def _stored_job(state, ref: str):
    job = state.find(ref)
    if job is None:
        raise CliError(f"no job {ref!r} in {state.path}", 2)
    return job


# ------------------------------------------------------------------------------ daemon
def cmd_daemon(args) -> int:
    """Run the daemon in the foreground (systemd runs it the same way, Type=notify)."""
    from daemon.core import Config
    from daemon.main import serve
    from daemon.store import default_state_dir
    from edgezo.spec import SpecError, parse_size

    user = args.user or not _is_root()  # without root there is no /var/lib/edgezo or /run/edgezo to use
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(user)
    sock = Path(args.socket) if args.socket else user_socket() if user else system_socket()
    try:
        budget = parse_size(args.budget, "--budget") if args.budget else None
        reserve = 256 * 2**20 if args.reserve is None else 0 if args.reserve.strip() in ("0", "0B") \
            else parse_size(args.reserve, "--reserve")
        overhead = parse_size(args.runtime_overhead, "--runtime-overhead") if args.runtime_overhead else None
        disk_reserve = parse_size(args.disk_reserve, "--disk-reserve")
    except SpecError as e:
        return _fail(e.message, 2)
    cfg = Config(
        state_dir=state_dir,
        socket_path=sock,
        budget=budget,
        reserve=reserve,
        disk_reserve=disk_reserve,
        sample_s=args.sample_interval,
        heartbeat_s=args.heartbeat,
        lease_ttl_s=args.lease_ttl,
        lease_policy=args.lease_policy,
        lease_max_wait_s=args.lease_max_wait,
        admit_max_wait_s=args.admit_max_wait,
        leases=not args.no_leases,
        pressure_grace_s=args.pressure_grace,
        max_jobs=args.max_jobs,
        retries=args.retries,
        stop_timeout_s=args.stop_timeout,
        device_index=args.device_index,
        device_source="system" if args.system_memory else None,
        engine=args.engine,
        runtime_overhead=overhead,
    )
    return serve(cfg)


def _is_root() -> bool:
    import os

    return os.getuid() == 0


# ------------------------------------------------------------------------------ enqueue
@_guard
def cmd_enqueue(args) -> int:
    """Validate a spec here (naming the bad field), then queue it on the daemon."""
    from edgezo.spec import DEFAULT_SPEC, SpecError, load_spec, read_spec_file

    try:
        raw = read_spec_file(args.spec if args.spec != "default" else DEFAULT_SPEC)
        raw = _absolute_paths(raw, Path(args.spec).parent if args.spec != "default" else Path.cwd())
        sets = _absolute_sets(args.set or [])
        _check_paths(load_spec(raw, sets))  # validate before bothering the daemon
    except SpecError as e:
        return _fail(str(e), 2)
    job = _client(args).enqueue(raw, sets=sets, window=args.window, at=args.at)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        extra = f" ({job['reason']})" if job.get("reason") else ""
        print(f"{job['id']} queued: needs ~{fmt_bytes(job.get('need_bytes'))}{extra}")
    return 0


def _absolute_sets(sets: list[str]) -> list[str]:
    """A relative path given with --set is relative to where the user typed it, not to the daemon."""
    from edgezo.spec import PATH_FIELDS

    out = []
    for item in sets:
        key, sep, value = item.partition("=")
        if sep and key.strip() in PATH_FIELDS and value not in ("", "default") and not Path(value).is_absolute():
            item = f"{key}={Path(value).resolve()}"
        out.append(item)
    return out


def _check_paths(spec: dict) -> None:
    """A model or data path that does not exist would only fail later, in the worker: name it now."""
    from edgezo.spec import SpecError, spec_paths

    for field, value in spec_paths(spec):
        if not Path(value).exists():
            raise SpecError(field, f"{value} does not exist (paths are read on this machine; a relative one is "
                            "relative to the spec file, or to this directory when given with --set)")


def _absolute_paths(raw: dict, base: Path) -> dict:
    """Relative model/data paths are relative to the spec file, not to the daemon's directory."""
    out = dict(raw)

    def fix(value):
        if isinstance(value, str) and value != "default" and not Path(value).is_absolute() and (base / value).exists():
            return str((base / value).resolve())
        return value

    if "model" in out:
        out["model"] = fix(out["model"])
    if isinstance(out.get("task"), dict):
        task = dict(out["task"])
        for key in ("train", "eval"):
            if key in task:
                task[key] = fix(task[key])
        out["task"] = task
    return out


# ------------------------------------------------------------------------------ status
COLUMNS = ("JOB", "STATE", "STEP", "STEPS/S", "MEM NOW", "PEAK", "AVG", "PHASE", "LEASE")


def _lease_cell(job: dict) -> str:
    cells = []
    for lease in job.get("leases") or []:
        if lease["state"] == "granted":
            cells.append(f"{lease['phase']} {fmt_bytes(lease['bytes'])}")
        else:
            cells.append(f"{lease['phase']} waiting {lease['waited_s']:.0f}s")
    return ", ".join(cells) or "-"


def _row(job: dict) -> tuple[str, ...]:
    state = job["state"]
    if state == JobState.RUNNING and job.get("control") == Control.PAUSE:
        state = "pausing"
    elif state == JobState.RUNNING and job.get("control") == Control.STOP:
        state = "stopping"
    running = job["state"] == JobState.RUNNING
    return (
        job["id"],
        state,
        f"{job.get('step', 0)}/{job.get('steps_total', '?')}",
        f"{job['steps_per_s']:.2f}" if running and job.get("steps_per_s") else "-",
        fmt_bytes(job.get("mem_now")) if running else "-",
        fmt_bytes(job.get("mem_peak")) if job.get("mem_peak") else "-",
        fmt_bytes(job.get("mem_avg")) if job.get("mem_avg") else "-",
        (job.get("phase") or "-") if running else "-",
        _lease_cell(job),
    )


def render_status(listing: dict) -> str:
    jobs = listing.get("jobs", [])
    rows = [COLUMNS] + [_row(j) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for j in jobs:
        if j.get("reason") and j["state"] in (JobState.QUEUED, JobState.PAUSED, JobState.FAILED, JobState.RUNNING):
            lines.append(f"  {j['id']}: {j['reason']}")
    dev = listing.get("device") or {}
    if dev.get("budget_bytes") is not None:
        lines.append(f"device ({dev.get('source')}): {fmt_bytes(dev.get('usage_bytes'))} used of budget "
                     f"{fmt_bytes(dev.get('budget_bytes'))}, headroom {fmt_bytes(dev.get('headroom_bytes'))}")
    return "\n".join(lines)


def render_job(job: dict) -> str:
    keys = ("id", "state", "reason", "step", "steps_total", "steps_per_s", "loss", "phase", "mem_now", "mem_peak",
            "mem_avg", "need_bytes", "window", "attempts", "job_dir", "pid")
    out = []
    for k in keys:
        v = job.get(k)
        if v in (None, ""):
            continue
        if k.startswith("mem_") or k == "need_bytes":
            v = fmt_bytes(v)
        out.append(f"{k:12} {v}")
    out.append(f"{'lease':12} {_lease_cell(job)}")
    return "\n".join(out)


@_guard
def cmd_status(args) -> int:
    """`ollama ps` for fine-tuning jobs; with JOB, one job in detail; with --watch, its progress line
    until it ends. Without a daemon, what its state directory says."""
    if args.watch and not args.job:
        return _fail("--watch follows one job: edgezo status JOB --watch", 2)
    c = _client(args)
    try:
        if args.watch:
            from edgezo.progress import follow_job

            info = follow_job(c, c.job(args.job)["id"], sys.stdout)
            return 0 if info.get("state") == JobState.DONE else 1
        job = c.job(args.job) if args.job else None
        listing = None if args.job else c.jobs()
    except DaemonNotRunning as e:
        with _state_dir(args.state_dir, e) as state:
            job = state.view(_stored_job(state, args.job)) if args.job else None
            listing = None if args.job else state.listing()
    if job is not None:
        print(json.dumps(job, indent=2) if args.json else render_job(job))
    else:
        print(json.dumps(listing, indent=2) if args.json else render_status(listing))
    return 0


@_guard
def cmd_cancel(args) -> int:
    job = _client(args).cancel(args.job)
    print(f"{job['id']}: {job['state']}" + (f" ({job['reason']})" if job.get("reason") else ""))
    return 0


@_guard
def cmd_retry(args) -> int:
    """Queue a failed or cancelled job again; it resumes from its seed-log (no step is redone)."""
    job = _client(args).retry(args.job, args.budget)
    print(f"{job['id']}: {job['state']}, resumes from step {job.get('step', 0)}"
          + (f" with budget {args.budget}" if args.budget else ""))
    return 0


@_guard
def cmd_logs(args) -> int:
    """The worker's log (progress lines, tracebacks); -f follows it until the job ends."""
    c = _client(args)
    from urllib.parse import quote

    path = f"/jobs/{quote(args.job, safe='')}/logs"
    try:
        if args.follow:
            for chunk in c.stream(path + "?follow=1"):
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            return 0
        sys.stdout.write(c.request("GET", path))
    except DaemonNotRunning as e:  # nothing runs without a daemon: the log as it was left
        with _state_dir(args.state_dir, e) as state:
            sys.stdout.write(state.log(_stored_job(state, args.job)))
    return 0


# ------------------------------------------------------------------------------ report
def remote_report(job: str, as_json: bool = False, plot_png: str | None = None, socket: str | None = None,
                  state_dir: str | None = None) -> int:
    """`edgezo report JOB` for a daemon job: the trainer's report plus the daemon's memory accounting;
    from the state directory when no daemon runs."""

    @_guard
    def run(_args) -> int:
        c = Client(socket)
        try:
            report = c.report(job)
            timeline = c.memory(job) if plot_png else None
        except DaemonNotRunning as e:
            with _state_dir(state_dir, e) as state:
                stored = _stored_job(state, job)
                report = state.report(stored)
                timeline = state.timeline(stored) if plot_png else None
        if plot_png:
            write_plots(Path(report["job"]["job_dir"]), plot_png, timeline=timeline)
        print(json.dumps(report, indent=2) if as_json else render_report(report))
        return 0

    return run(None)


def write_plots(job_dir: Path, png: str, timeline: dict | None = None) -> None:
    """`--plot PNG`: the memory timeline to PNG (the daemon's samples when given, else the job
    directory's), the loss/accuracy chart beside it; each path is said on stderr."""
    from edgezo.plots import plot_job

    for path, what in plot_job(job_dir, png, timeline=timeline):
        print(f"wrote {path} ({what})", file=sys.stderr)


def render_report(report: dict) -> str:
    """The trainer's report as `edgezo report JOB_DIR` prints it, plus the daemon's own measurements."""
    from edgezo.report import render

    memory = report.get("memory") or {}
    lines = [f"daemon job {report.get('job', {}).get('id', '?')}", render(report)] if report.get("steps_total") \
        else [f"job        {report.get('job', {}).get('id', '?')}", f"status     {report.get('status')}",
              f"steps      {report.get('steps_done')}"]
    d = memory.get("daemon")
    if d:
        lines.append(f"daemon     peak {fmt_bytes(d.get('peak_bytes'))}, avg {fmt_bytes(d.get('avg_bytes'))} "
                     f"({d.get('meter')}, {d.get('samples')} samples)")
        for name, p in (d.get("phases") or {}).items():
            lines.append(f"  {name:10} peak {fmt_bytes(p.get('peak_bytes'))}, avg {fmt_bytes(p.get('avg_bytes'))}, "
                         f"{p.get('duration_s', 0):.1f} s")
    if report.get("disk") and not report.get("steps_total"):  # render() above shows it otherwise
        from edgezo.report import disk_line

        lines.append(disk_line(report["disk"]))
    if report.get("job", {}).get("reason"):
        lines.append(f"reason     {report['job']['reason']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ wiring
def _socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="daemon socket (default: $EDGEZO_SOCKET, then the user and system defaults)")


def _state_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="read this state directory when no daemon answers (default: the user-mode "
                   "one, then /var/lib/edgezo)")


def add_commands(sub) -> None:
    d = sub.add_parser("daemon", help="run the scheduling daemon (foreground; systemd/--user)")
    d.add_argument("--user", action="store_true", help="user mode: state in ~/.local/state, socket in $XDG_RUNTIME_DIR")
    d.add_argument("--state-dir", help="state directory (SQLite store and job directories)")
    _socket_arg(d)
    d.add_argument("--budget", help="memory budget, e.g. 6GiB (default: 90%% of the device)")
    d.add_argument("--reserve", help="device memory never handed out (default 256MiB)")
    d.add_argument("--disk-reserve", default="256MiB",
                   help="no job starts (or resumes) with less free disk under the state directory (default 256MiB)")
    d.add_argument("--foreground", action="store_true", help="accepted for clarity: the daemon always runs in the foreground")
    d.add_argument("--sample-interval", type=float, default=0.5, help="seconds between memory samples")
    d.add_argument("--heartbeat", type=float, default=2.0, help="seconds between worker heartbeats")
    d.add_argument("--lease-ttl", type=float, default=10.0, help="a lease expires this long after the last heartbeat")
    d.add_argument("--lease-policy", choices=("fifo", "phase-offset"), default="fifo")
    d.add_argument("--lease-max-wait", type=float, default=30.0, help="bounded wait: no overtaking after this")
    d.add_argument("--admit-max-wait", type=float, default=600.0, help="bounded wait for admission")
    d.add_argument("--no-leases", action="store_true", help="grant every lease at once (benchmarks: no staggering)")
    d.add_argument("--pressure-grace", type=float, default=5.0, help="seconds over budget before a job is paused")
    d.add_argument("--max-jobs", type=int, help="at most this many running jobs")
    d.add_argument("--retries", type=int, default=0, help="re-run a worker killed by a signal this many times")
    d.add_argument("--stop-timeout", type=float, default=30.0, help="seconds to let workers checkpoint on stop")
    d.add_argument("--device-index", type=int, default=0)
    d.add_argument("--system-memory", action="store_true", help="budget system memory even where a GPU answers")
    d.add_argument("--engine", help="worker engine: trainer (default) | synthetic | module:function")
    d.add_argument("--runtime-overhead", help="per-worker runtime memory for estimates (default 384MiB CPU, 512MiB CUDA)")
    d.set_defaults(func=cmd_daemon)

    e = sub.add_parser("enqueue", help="queue a job on the daemon")
    e.add_argument("spec", help="spec file (YAML/JSON), or 'default'")
    e.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field (repeatable)")
    when = e.add_mutually_exclusive_group()
    when.add_argument("--window", metavar="CRON", help="run only inside this cron window, e.g. '* 1-5 * * *'")
    when.add_argument("--at", metavar="CRON", help="start at the next time this cron expression fires")
    e.add_argument("--json", action="store_true")
    _socket_arg(e)
    e.set_defaults(func=cmd_enqueue)

    s = sub.add_parser("status", help="jobs on the daemon (like `ollama ps`); without one, its state directory")
    s.add_argument("job", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="follow JOB: a progress line (loss, steps/s, ETA, "
                   "memory, phase, lease) until it ends")
    _socket_arg(s)
    _state_dir_arg(s)
    s.set_defaults(func=cmd_status)

    c = sub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("job")
    _socket_arg(c)
    c.set_defaults(func=cmd_cancel)

    rt = sub.add_parser("retry", help="queue a failed or cancelled job again; it resumes from its seed-log")
    rt.add_argument("job")
    rt.add_argument("--budget", help="a new per-job budget (e.g. 3GiB; 'null' removes it)")
    _socket_arg(rt)
    rt.set_defaults(func=cmd_retry)

    lg = sub.add_parser("logs", help="a job's worker log")
    lg.add_argument("job")
    lg.add_argument("-f", "--follow", action="store_true")
    _socket_arg(lg)
    _state_dir_arg(lg)
    lg.set_defaults(func=cmd_logs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgezo")
    sub = p.add_subparsers(dest="command", required=True)
    add_commands(sub)
    r = sub.add_parser("report", help="a daemon job's report")
    r.add_argument("job")
    r.add_argument("--json", action="store_true")
    r.add_argument("--plot", metavar="PNG")
    _socket_arg(r)
    _state_dir_arg(r)
    r.set_defaults(func=lambda a: remote_report(a.job, a.json, a.plot, a.socket, a.state_dir))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
