"""A fleet on one machine, for trying it and for tests: a SuperLink and N SuperNodes as local
processes on loopback, each SuperNode with its own edgezo daemon, state directory and data shard.

Insecure (no TLS, no SuperNode authentication) because everything stays on 127.0.0.1; a real fleet
runs with both (docs/fleet.md). The Flower app itself is a directory holding one pyproject.toml
(`write_app`, `edgezo fleet app DIR`) whose components are edgezo's own modules.

Torch-free. Every process started here is in its own session and is stopped (or killed) by `stop`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the edgezo source tree: put first on every process's path

APP_CONFIG = {  # [tool.flwr.app.config]: every key `flwr run --run-config` may override
    "rounds": 3,
    "steps-per-round": 4,
    "spec": "default",  # the federation's job: a spec file on the server host, or "default"
    "set": "",  # spec overrides, key.path=value separated by ';'
    "seed": 0,
    "min-devices": 1,  # wait for this many SuperNodes before round 1 ...
    "join-timeout": 120.0,  # ... at most this long
    "round-timeout": 900.0,  # a device that has not answered by then is left out (dropped)
    "out-dir": "fleet-out",  # summary.json and federation/ (the federation's log) go here
    "base-model-hash": "",  # empty: the one most devices report in round 1
    "final-eval-size": 0,  # each device evaluates the federated model on this many of its eval rows
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_app(directory: Path, config: dict | None = None) -> Path:
    """The Flower app for `flwr run`: a pyproject.toml naming edgezo's ServerApp and ClientApp. edgezo
    and flwr are installed on every host already, so the app bundle carries no code and no dependency
    (the SuperLink and SuperNodes must not try to install anything: they may be offline)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**APP_CONFIG, **(config or {})}
    unknown = sorted(set(cfg) - set(APP_CONFIG))
    if unknown:
        raise ValueError(f"unknown fleet setting {unknown[0]!r} (known: {', '.join(APP_CONFIG)})")
    lines = [
        "# Written by `edgezo fleet app`: run with `flwr run . <superlink-connection> --stream`.",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", 'name = "edgezo-fleet"', 'version = "1.0.0"',
        'description = "Federated zeroth-order fine-tuning: edgezo devices exchange seed-log records"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["."]', "",
        "[tool.flwr.app]", 'publisher = "edgezo"', "",
        "[tool.flwr.app.components]", 'serverapp = "edgezo.fleet.server_app:app"',
        'clientapp = "edgezo.fleet.client_app:app"', "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in cfg.items()), "",
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode} before listening on {port}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s:\n{_tail(log)}")


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def split_rows(src: Path, n: int, out_dirs: list[Path], name: str = "train.jsonl") -> list[Path]:
    """Shard i gets rows i, i+n, i+2n, ... of a JSONL file (each device's private data)."""
    rows = [ln for ln in Path(src).read_text().splitlines() if ln.strip()]
    out = []
    for i, d in enumerate(out_dirs):
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        p.write_text("".join(r + "\n" for r in rows[i::n]))
        out.append(p)
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass


class LocalFleet:
    """`with LocalFleet(root, shards, evals) as fleet: summary = fleet.run(app_config)`."""

    CONNECTION = "edgezo-local"

    def __init__(self, root: Path, shards: list[Path], evals: list[Path] | None = None, *, budget: str = "2GiB",
                 daemon_args: tuple[str, ...] = (), env: dict | None = None,
                 node_config: dict[int, dict] | None = None):
        self.root = Path(root)
        self.shards = [Path(s) for s in shards]
        self.evals = [Path(e) for e in (evals or shards)]
        self.budget, self.daemon_args = budget, tuple(daemon_args)
        self.node_config = node_config or {}  # extra --node-config entries per device index (e.g. model=)
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ezf", dir="/tmp"))  # AF_UNIX paths: at most 107 bytes
        self.env = dict(os.environ)
        self.env.update({"FLWR_HOME": str(self.root / "flwr-home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                         "PATH": str(Path(sys.executable).parent) + os.pathsep + self.env.get("PATH", ""),
                         "PYTHONPATH": str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")})
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.update(env or {})
        self.superlink: Proc | None = None
        self.daemons: list[Proc] = []
        self.supernodes: list[Proc] = []
        self.port = 0

    # -- processes ------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.root),
                                 start_new_session=True)
        return Proc(name, p, log)

    def device_dir(self, i: int) -> Path:
        return self.root / f"dev-{i}"

    def socket(self, i: int) -> Path:
        return self.sock_dir / f"dev-{i}.sock"

    def start(self) -> LocalFleet:
        self.root.mkdir(parents=True, exist_ok=True)
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self.superlink = self._spawn("superlink", [
            "flower-superlink", "--insecure", "--port", str(self.port), "--disable-runtime-dependency-installation"])
        for i in range(len(self.shards)):
            self.start_daemon(i)
        _wait_port(self.port, self.superlink.popen, self.superlink.log)
        for i in range(len(self.shards)):
            self.wait_daemon(i)
            self.start_supernode(i)
        return self

    def start_daemon(self, i: int) -> None:
        d = self.device_dir(i)
        proc = self._spawn(f"daemon-{i}", [
            sys.executable, "-m", "edgezo.daemon_cli", "daemon", "--state-dir", str(d / "daemon"),
            "--socket", str(self.socket(i)), "--budget", self.budget, *self.daemon_args])
        self.daemons[i:i + 1] = [proc]

    def wait_daemon(self, i: int, timeout: float = 60.0) -> None:
        from edgezo.client import Client

        end = time.monotonic() + timeout
        while True:
            if not self.daemons[i].alive():
                raise RuntimeError(f"daemon {i} exited:\n{_tail(self.daemons[i].log)}")
            try:
                Client(self.socket(i), timeout=5).health()
                return
            except Exception:
                if time.monotonic() > end:
                    raise RuntimeError(f"daemon {i} did not answer in {timeout:.0f} s:\n{_tail(self.daemons[i].log)}") from None
                time.sleep(0.2)

    def start_supernode(self, i: int) -> None:
        d = self.device_dir(i)
        node_config = (f"device='dev-{i}' state-dir='{d / 'fleet'}' socket='{self.socket(i)}' "
                       f"train='{self.shards[i]}' eval='{self.evals[i]}'")
        node_config += "".join(f" {k}='{v}'" for k, v in self.node_config.get(i, {}).items())
        proc = self._spawn(f"supernode-{i}", [
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
            "--node-config", node_config])
        self.supernodes[i:i + 1] = [proc]

    def kill_device(self, i: int) -> None:
        """The device goes away at once (power loss): its SuperNode, ClientApp, daemon and workers."""
        import psutil

        for p in (self.supernodes[i], self.daemons[i]):
            p.signal(signal.SIGKILL)
            p.popen.wait(10)
        for proc in psutil.process_iter(["cmdline"]):  # workers run in sessions of their own
            cmd = proc.info.get("cmdline") or []
            if any(str(self.device_dir(i)) in c for c in cmd):
                try:
                    proc.kill()
                except psutil.Error:
                    pass

    # -- runs -------------------------------------------------------------------------------------
    def run(self, config: dict, timeout: float = 1800.0) -> dict:
        """`flwr run` the edgezo app with `config`; returns summary.json (flwr run's exit code says
        nothing about the ServerApp: it is 0 even when the ServerApp raised)."""
        return self.wait(self.run_async(config), timeout)

    def run_async(self, config: dict) -> tuple[subprocess.Popen, Path]:
        config = {"out-dir": str(self.root / "server"), "min-devices": len(self.shards), **config}
        app = write_app(self.root / "app", config)
        with open(self.root / "logs" / "flwr-run.log", "ab") as f:
            p = subprocess.Popen(["flwr", "run", str(app), self.CONNECTION, "--stream"], stdout=f,
                                 stderr=subprocess.STDOUT, env=self.env, cwd=str(self.root), start_new_session=True)
        return p, Path(config["out-dir"]) / "summary.json"

    def wait(self, run: tuple[subprocess.Popen, Path], timeout: float = 1800.0) -> dict:
        """The summary once the ServerApp has written its last one (done or error). `flwr run --stream`
        may outlive the run by a few seconds while it drains logs; it is stopped once the summary is in."""
        proc, path = run
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):
                summary = {}
            if summary.get("status") in ("done", "error"):
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
                return summary
            if proc.poll() is not None and not summary:
                raise RuntimeError("flwr run ended and the ServerApp wrote no summary.json; flwr run said:\n"
                                   + _tail(self.root / "logs" / "flwr-run.log"))
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError(f"the federation did not finish within {timeout:.0f} s; see {self.root / 'logs'}")

    def stop(self) -> None:
        procs = [p for p in (*self.supernodes, self.superlink, *self.daemons) if p is not None]
        for p in procs:
            p.signal(signal.SIGTERM)
        end = time.monotonic() + 20
        for p in procs:
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            p.signal(signal.SIGKILL)
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        import shutil

        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
