"""The ServerApp: drives the rounds, checks and merges the devices' records, keeps the federation's log.

Per round: every device still in the federation gets a `train` message with the merged records it
lacks (and, on first contact, the federation's spec); it runs K steps as a job on its daemon and
answers with its step records. A device that does not answer within `round-timeout`, answers with
an error, or sends records that fail `records.check_round` is left out of the round, with the
reason in the log and in summary.json; the others' records are merged (`records.merge`) and the
round goes on. A device that missed a deadline is not waited for again (a restarted SuperNode
registers anew and catches up by replay). After the last round every device gets an `evaluate`
message with the last records and rebuilds the federated model by replay.

`flwr run` exits 0 even when a ServerApp raises, so summary.json (written after every round, and
with "error" when the run failed) is what a caller reads.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from edgezo.fleet import FLEET_METHODS
from edgezo.fleet import records as rec_mod
from edgezo.fleet.fedlog import FedLog
from edgezo.jobdir import write_json_atomic

log = logging.getLogger("edgezo.fleet")
app = ServerApp()


@dataclass
class Node:
    node_id: int
    device: str | None = None
    known: int = 0  # merged records this device confirmed holding
    has_spec: bool = False
    has_header: bool = False
    sent_header: bool = False  # it sent its seed-log header once; later rounds send records only
    dropped: str | None = None
    rounds: list = field(default_factory=list)


def fleet_spec(cfg: dict) -> dict:
    """The federation's spec: the job every round runs, minus what each device fills in."""
    from edgezo.spec import DEFAULT_SPEC, apply_sets, load_spec, read_spec_file, validate

    src = cfg.get("spec") or "default"
    raw = read_spec_file(DEFAULT_SPEC if src == "default" else Path(src))
    sets = [s for s in str(cfg.get("set", "")).split(";") if s.strip()]
    raw = apply_sets(raw, sets)
    raw.pop("window", None)
    raw.update(name="federation", steps=0, seed=int(cfg.get("seed", 0)), eval_every=0, from_log=None, output=None)
    if raw.get("noise", "auto") == "auto":  # every device must draw the same directions from the same seeds
        raw["noise"] = "torch"
    guard = dict(raw.get("guard") or {})
    guard["rise"], guard["held_out"] = 0.0, 0  # rollbacks rebuild from the base model; a round starts from the log
    raw["guard"] = guard
    spec = validate(raw)
    load_spec(spec)  # idempotent: what devices validate again is this
    if spec["method"] not in FLEET_METHODS:
        raise rec_mod.RecordError(f"method: {spec['method']} cannot be federated by records: its updates are not "
                                  f"redone from step records alone (use {', '.join(FLEET_METHODS)})")
    if spec["trainable"] == "lora":
        raise rec_mod.RecordError("trainable: lora draws its adapters from each job's seed, so devices' records "
                                  "would apply to different adapters; federate full, topK or named modules")
    return spec


def _payload_bytes(rd: RecordDict) -> int:
    """Bytes of what a message carries (the values of its config record, not Flower's framing)."""
    n = 0
    for rec in rd.config_records.values():
        for k, v in rec.items():
            n += len(k) + (len(v) if isinstance(v, (bytes, str)) else 8)
    return n


class Federation:
    def __init__(self, grid: Grid, cfg: dict):
        self.grid, self.cfg = grid, cfg
        self.out = Path(str(cfg["out-dir"]))
        self.out.mkdir(parents=True, exist_ok=True)
        self.spec = fleet_spec(cfg)
        self.seed = int(self.spec["seed"])
        self.rounds = int(cfg.get("rounds", 3))
        self.steps = int(cfg.get("steps-per-round", 4))
        self.timeout = float(cfg.get("round-timeout", 600))
        self.log = FedLog(self.out / "federation")
        if self.log.header is not None:
            raise rec_mod.RecordError(f"{self.log.dir} already holds a federation's log; use another out-dir")
        self.expected_hash = str(cfg.get("base-model-hash", "") or "") or None
        self.nodes: dict[int, Node] = {}
        self.summary: dict = {"spec": self.spec, "rounds_total": self.rounds, "steps_per_round": self.steps,
                              "rounds": [], "devices": [], "log": str(self.log.dir), "status": "running"}

    def save(self) -> None:
        self.summary["devices"] = [{"device": n.device, "node_id": n.node_id, "dropped": n.dropped, "known": n.known,
                                    "rounds": n.rounds} for n in self.nodes.values()]
        write_json_atomic(self.out / "summary.json", self.summary)

    def wait_for_nodes(self) -> None:
        want, deadline = int(self.cfg.get("min-devices", 1)), time.monotonic() + float(self.cfg.get("join-timeout", 120))
        while len(list(self.grid.get_node_ids())) < want and time.monotonic() < deadline:
            time.sleep(0.2)

    def live(self) -> list[Node]:
        for nid in self.grid.get_node_ids():
            self.nodes.setdefault(nid, Node(nid))
        return [n for n in self.nodes.values() if n.dropped is None]

    def message(self, node: Node, kind: str, rnd: int, extra: dict) -> Message:
        c = {"round": rnd, "steps": self.steps, "fed-seed": self.seed, "log-from": node.known,
             "log": self.log.frames_since(node.known) if self.log.header else b"",
             "want-header": not node.sent_header, **extra}
        if not node.has_spec:
            c["spec"] = json.dumps(self.spec, separators=(",", ":"))
        if self.log.header is not None and not node.has_header:
            c["header"] = json.dumps(self.log.header, separators=(",", ":"))
        return Message(RecordDict({"fleet": ConfigRecord(c)}), dst_node_id=node.node_id, message_type=kind,
                       group_id=str(rnd))

    def exchange(self, kind: str, rnd: int, extra: dict) -> tuple[dict[int, Message], dict[int, int], list[Node]]:
        nodes = self.live()
        msgs = {n.node_id: self.message(n, kind, rnd, extra) for n in nodes}
        down = {nid: _payload_bytes(m.content) for nid, m in msgs.items()}
        replies = {}
        for r in self.grid.send_and_receive(list(msgs.values()), timeout=self.timeout):
            replies[r.metadata.src_node_id] = r
        return replies, down, nodes

    def _accept_log(self, node: Node, c: dict, sent: Message) -> None:
        """What the device holds now: everything the message carried was applied before it trained."""
        node.has_spec = True
        node.has_header = node.has_header or self.log.header is not None
        node.known = self.log.steps
        node.device = node.device or str(c.get("device"))

    def run_round(self, rnd: int) -> None:
        t0 = time.monotonic()
        replies, down, nodes = self.exchange(MessageType.TRAIN, rnd, {})
        accepted, headers, info, left_out = {}, {}, {}, []
        names = {}
        for node in sorted(nodes, key=lambda n: n.node_id):
            who = node.device or f"node {node.node_id}"
            reply = replies.get(node.node_id)
            if reply is None:
                node.dropped = f"round {rnd}: no reply within {self.timeout:.0f} s (dropped out)"
                left_out.append({"device": who, "reason": node.dropped})
                log.warning("round %d: leaving out %s: %s", rnd, who, node.dropped)
                continue
            if reply.has_error():
                reason = f"the device failed: {reply.error.reason}"
                left_out.append({"device": who, "reason": reason})
                log.warning("round %d: leaving out %s: %s", rnd, who, reason)
                continue
            c = dict(reply.content["fleet"])
            self._accept_log(node, c, reply)
            who = node.device
            try:
                if who in names:
                    raise rec_mod.RecordError(f"device name {who!r} is already taken by node {names[who]}")
                names[who] = node.node_id
                if c.get("header"):
                    headers[who] = json.loads(c["header"])
                elif not node.sent_header:
                    raise rec_mod.RecordError("no seed-log header (the device must send it until it is accepted)")
                records = rec_mod.decode(c["records"])
                seeds = rec_mod.round_seeds(rec_mod.round_seed(self.seed, rnd, who), self.steps,
                                            self.spec["optim"]["perturbations"])
                accepted[who] = rec_mod.check_round(records, seeds=seeds, spec=self.spec)
                info[who] = {"node_id": node.node_id, "up_bytes": _payload_bytes(reply.content),
                             "down_bytes": down[node.node_id], "records": len(records), "job": c.get("job"),
                             "seconds": c.get("seconds"), "mean_loss": _mean(r["loss"] for r in accepted[who])}
                node.rounds.append(rnd)
            except (rec_mod.RecordError, ValueError, KeyError) as e:
                accepted.pop(who, None)
                reason = f"malformed records: {e}"
                left_out.append({"device": who, "reason": reason})
                log.warning("round %d: leaving out %s: %s", rnd, who, reason)
        self._check_headers(accepted, headers, left_out, rnd)
        for node in nodes:
            if node.device in accepted and node.device in headers:
                node.sent_header = True  # accepted: later rounds carry records only
        for who in list(info):
            if who not in accepted:
                info.pop(who)
        merged = rec_mod.merge(accepted, self.log.steps, rnd) if accepted else []
        if merged:
            self.log.append(merged)
        self.summary["rounds"].append({"round": rnd, "merged": sorted(accepted), "records": len(merged),
                                       "log_steps": self.log.steps, "left_out": left_out, "devices": info,
                                       "seconds": time.monotonic() - t0})
        log.info("round %d: merged %d records from %s; left out %s", rnd, len(merged), sorted(accepted),
                 [x["device"] for x in left_out] or "none")
        self.save()

    def _check_headers(self, accepted: dict, headers: dict, left_out: list, rnd: int) -> None:
        """Every accepted device's seed-log header must match the federation's (created from the first
        round's devices: the base-model hash given in the run config, else the one most of them report)."""
        if self.log.header is None and headers:
            from edgezo.spec import spec_hash

            order = sorted(headers)
            subs = {d: rec_mod.header_subset(headers[d]) for d in order}
            cands = [d for d in order if not self.expected_hash or subs[d]["base_model_hash"] == self.expected_hash]
            if cands:  # the header most devices share; a tie goes to the first name
                first = max(cands, key=lambda d: (sum(subs[d] == subs[o] for o in cands), -order.index(d)))
                self.log.create(self.spec, {**headers[first], "spec_hash": spec_hash(self.spec),
                                            "method": self.spec["method"], "created": time.time(),
                                            "fleet": {"seed": self.seed, "from": first}})
        mine = rec_mod.header_subset(self.log.header) if self.log.header else None
        for who in sorted(accepted):
            h = headers.get(who)
            if h is None:
                continue
            try:
                if mine is None:
                    raise rec_mod.RecordError(f"base-model hash {h.get('base_model_hash')} is not the expected "
                                              f"{self.expected_hash}")
                rec_mod.check_header(mine, rec_mod.header_subset(h))
            except rec_mod.RecordError as e:
                accepted.pop(who)
                left_out.append({"device": who, "reason": f"malformed records: {e}"})
                log.warning("round %d: leaving out %s: %s", rnd, who, e)

    def finish(self) -> None:
        replies, down, nodes = self.exchange(MessageType.EVALUATE, self.rounds + 1,
                                             {"eval-size": int(self.cfg.get("final-eval-size", 0))})
        final = {}
        for node in nodes:
            reply = replies.get(node.node_id)
            who = node.device or f"node {node.node_id}"
            if reply is None or reply.has_error():
                final[who] = {"error": reply.error.reason if reply is not None else "no reply"}
                continue
            c = dict(reply.content["fleet"])
            self._accept_log(node, c, reply)
            final[node.device] = {"weights_sha256": c.get("weights_sha256"), "output": c.get("output"),
                                  "accuracy": c.get("accuracy"), "log_steps": c.get("log_steps"),
                                  "down_bytes": down[node.node_id]}
        self.summary["final"] = final
        self.summary["log_steps"] = self.log.steps
        self.summary["status"] = "done"
        self.save()


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    fed = None
    try:
        fed = Federation(grid, cfg)
        fed.save()
        fed.wait_for_nodes()
        for rnd in range(1, fed.rounds + 1):
            fed.run_round(rnd)
        fed.finish()
    except BaseException as e:
        out = Path(str(cfg.get("out-dir", ".")))
        summary = fed.summary if fed is not None else {}
        summary.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "summary.json", summary)
        raise
