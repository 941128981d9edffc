"""The device side of a round: bring the local copy of the federation's log up to date, run the round
as an ordinary job on this device's own edgezo daemon (so it waits for admission, runs under the
device's memory budget and leases, and shows in `edgezo status` like any other job), and hand back
the job's step records.

Torch-free: the training happens in the daemon's worker. Everything the device keeps lives under its
fleet state directory: `federation/` (its copy of the federation's log, replayable with `edgezo
replay`), `rounds/` (the immutable log each round job starts from) and `device.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from edgezo import seedlog
from edgezo.fleet import records as rec_mod
from edgezo.fleet.fedlog import FedLog
from edgezo.jobdir import SEEDLOG, write_json_atomic
from edgezo.protocol import EdgezoError, JobState


class FleetError(EdgezoError, RuntimeError):
    kind, label = "fleet", "fleet error"


@dataclass
class DeviceConfig:
    """A device's own settings (the SuperNode's --node-config): never sent by the server."""

    name: str  # unique in the federation; orders the merge
    state_dir: Path  # where this device keeps its copy of the log and its round logs
    socket: str | None  # its edgezo daemon (None: $EDGEZO_SOCKET, then the defaults)
    train: str  # its private data (task.train of its round jobs)
    eval: str  # its evaluation data
    budget: str | None = None  # per-job budget for its round jobs (the daemon's own budget applies anyway)
    model: str | None = None  # where this device keeps the base model (default: the spec's; the hash must match)

    @classmethod
    def from_node_config(cls, cfg: dict) -> DeviceConfig:
        missing = [k for k in ("device", "state-dir", "train") if not cfg.get(k)]
        if missing:
            raise FleetError(f"SuperNode --node-config lacks {missing[0]}= (needs device=, state-dir=, train=; "
                             "optional eval=, socket=, budget=, model=)")
        return cls(name=str(cfg["device"]), state_dir=Path(str(cfg["state-dir"])),
                   socket=str(cfg["socket"]) if cfg.get("socket") else None, train=str(cfg["train"]),
                   eval=str(cfg.get("eval") or cfg["train"]), budget=str(cfg["budget"]) if cfg.get("budget") else None,
                   model=str(cfg["model"]) if cfg.get("model") else None)


class Device:
    def __init__(self, cfg: DeviceConfig):
        self.cfg = cfg
        self.dir = cfg.state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = FedLog(self.dir / "federation")

    # -- the federation's log ------------------------------------------------------------------
    def sync(self, spec: dict | None, header: dict | None, log_from: int, frames: bytes) -> None:
        """Apply what the server sent: the spec and header on first contact, then the merged records
        from `log_from` on. Records this copy already holds from `log_from` on are replaced (a reply
        the server never got), so the copy is the server's log after every sync."""
        if spec is not None:
            write_json_atomic(self.dir / "device.json", {"spec": spec})
        if header is not None:
            self.log.create(self.spec(), header)
        new = rec_mod.decode(frames)
        if not new and self.log.header is None:
            return
        if self.log.header is None:
            raise FleetError("the server sent records before the federation's header")
        if log_from > self.log.steps:
            raise FleetError(f"the server sent records from step {log_from}, this device holds {self.log.steps}")
        self.log.truncate(log_from)
        self.log.append(new)

    def spec(self) -> dict:
        p = self.dir / "device.json"
        if not p.exists():
            raise FleetError("no federation spec yet (the server sends it on first contact)")
        return json.loads(p.read_text())["spec"]

    def start_log(self, rnd: int) -> str | None:
        """The immutable copy of the log this round's job starts from (None before the first merge)."""
        if not self.log.steps:
            return None
        for old in (self.dir / "rounds").glob("*.ezl"):  # a finished round's copy is no longer read
            old.unlink(missing_ok=True)
        return str(self.log.copy_to(self.dir / "rounds" / f"round-{rnd:04d}-{self.log.steps}.ezl"))

    # -- jobs on the device's daemon -----------------------------------------------------------
    def job_spec(self, *, name: str, seed: int, steps: int, from_log: str | None, eval_size: int) -> dict:
        spec = self.spec()
        spec = {**spec, "name": name, "output": name, "seed": seed, "steps": steps, "from_log": from_log,
                "eval_every": 0, "eval_size": eval_size, "budget": self.cfg.budget,
                "task": {**spec["task"], "train": self.cfg.train, "eval": self.cfg.eval}}
        if self.cfg.model:
            spec["model"] = self.cfg.model
        return spec

    def run_job(self, spec: dict, timeout: float | None = None) -> dict:
        """Enqueue on this device's daemon and wait for the job to end; the job's record when done."""
        from edgezo.client import Client

        client = Client(self.cfg.socket, timeout=30)
        for old in client.jobs()["jobs"]:  # a round job left running by a restart: its round is over
            if old["name"].startswith("fleet-") and old["state"] not in (JobState.DONE, JobState.FAILED,
                                                                       JobState.CANCELLED):
                client.cancel(old["id"])
        job = client.enqueue(spec)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = client.job(job["id"])
            if info["state"] in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
                break
            if deadline is not None and time.monotonic() > deadline:
                client.cancel(job["id"])
                raise FleetError(f"job {job['id']} did not finish within {timeout:.0f} s; cancelled")
            time.sleep(0.25)
        if info["state"] != JobState.DONE:
            raise FleetError(f"round job {job['id']} {info['state']}: {info.get('reason') or info.get('error')}")
        return info

    def train_round(self, rnd: int, steps: int, fed_seed: int, want_header: bool) -> dict:
        """Run round `rnd` and return what goes back to the server."""
        t0 = time.monotonic()
        seed = rec_mod.round_seed(fed_seed, rnd, self.cfg.name)
        spec = self.job_spec(name=f"fleet-r{rnd:04d}", seed=seed, steps=steps, from_log=self.start_log(rnd),
                             eval_size=0)
        info = self.run_job(spec)
        header, frames = seedlog.read(Path(info["job_dir"]) / SEEDLOG)
        steps_out = [{k: f.data[k] for k in rec_mod.WIRE_FIELDS if k in f.data}
                     for f in frames if f.kind == seedlog.STEP]
        return {"records": rec_mod.encode(steps_out),
                "header": json.dumps(rec_mod.wire_header(header)) if want_header else "",
                "job": info["id"], "seconds": time.monotonic() - t0}

    def finish(self, eval_size: int) -> dict:
        """After the last round: rebuild the federated model by replay as a job (steps 0) on the daemon;
        its output is the model this device now serves. Returns the weights' digest and the eval."""
        spec = self.job_spec(name=f"fleet-final-{self.log.steps}", seed=0, steps=0,
                             from_log=self.start_log(10**6 - 1), eval_size=eval_size)
        info = self.run_job(spec)
        out = Path(info["job_dir"]) / spec["output"]
        report = json.loads((Path(info["job_dir"]) / "report.json").read_text())
        final = (report.get("metrics") or {}).get("final") or {}
        return {"weights_sha256": weights_digest(out), "output": str(out),
                "accuracy": final.get("accuracy", -1.0), "log_steps": self.log.steps}


def weights_digest(model_dir: Path) -> str:
    """sha256 over the tensors of an exported model directory (names and raw bytes, in name order):
    equal digests mean bit-identical weights, whatever the file layout."""
    import hashlib

    from safetensors import safe_open

    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in sorted(st.keys()):
                t = st.get_tensor(name)
                h.update(name.encode() + str(t.dtype).encode() + str(t.shape).encode() + t.tobytes())
    return h.hexdigest()
