"""`edgezo fleet ...`: the commands of the fleet (torch- and flwr-free to import)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgezo.fleet.launch import APP_CONFIG, write_app


def cmd_app(args: argparse.Namespace) -> int:
    config = {}
    for key, default in APP_CONFIG.items():
        value = getattr(args, key.replace("-", "_"))
        if value is not None:
            config[key] = ";".join(value) if key == "set" else type(default)(value)
    if "out-dir" in config:
        config["out-dir"] = str(Path(config["out-dir"]).resolve())  # the ServerApp runs elsewhere
    if config.get("spec", "default") != "default":
        config["spec"] = str(Path(config["spec"]).resolve())
    d = write_app(Path(args.dir), config)
    print(f"wrote {d / 'pyproject.toml'}; start the federation with:\n"
          f"  flwr run {d} <superlink-connection> --stream\n"
          "(connections live in $FLWR_HOME/config.toml; docs/fleet.md has a local and a TLS example)")
    return 0


def add_commands(sub) -> None:
    f = sub.add_parser("fleet", help="federated ZO on Flower: devices exchange seed-log records (docs/fleet.md)")
    fsub = f.add_subparsers(dest="fleet_command", required=True)
    a = fsub.add_parser("app", help="write the Flower app (a pyproject.toml) that `flwr run` starts")
    a.add_argument("dir", help="directory for the app")
    helps = {"spec": "the federation's job spec on the server host (default: the packaged default job)",
             "set": "override a field of that spec (repeatable)", "rounds": "rounds to run",
             "steps-per-round": "steps each device trains per round",
             "round-timeout": "seconds before a silent device is left out", "out-dir": "where summary.json and "
             "federation/ (the federation's log) go", "min-devices": "SuperNodes to wait for before round 1",
             "base-model-hash": "the base model every device must hold (default: what most report)",
             "final-eval-size": "eval rows each device scores the final model on"}
    for key, default in APP_CONFIG.items():
        kw = {"action": "append", "metavar": "KEY.PATH=VALUE"} if key == "set" else {"metavar": type(default).__name__.upper()}
        a.add_argument(f"--{key}", help=f"{helps.get(key, key)} (default {default!r})", **kw)
    a.set_defaults(func=cmd_app)
