"""A fleet on one machine: bytes on the wire and accuracy, federated vs alone vs centralised.

    python bench/fleet.py                                 # 3 devices x 3 rounds x 8 steps, packaged model
    python bench/fleet.py --devices 3 --rounds 4 --steps 10 --dev 300

Starts a real SuperLink and N SuperNodes on loopback (edgezo.fleet.launch), each with its own edgezo
daemon, state directory and shard of the packaged train sentences (the first --pool of them, dealt
round-robin), and runs R rounds of K steps of the recipe below. Then, at equal total forward passes
(N x R x K steps in all): each device alone on its shard for N x R x K steps, and one device on the
whole pool for N x R x K steps, in the foreground. Every model is scored on the same --dev sentences
(95 % interval from the normal approximation).

Bytes are what the messages carry (the values of the config record each way, not Flower's framing):
a device's records up, the merged records (and, on first contact, the spec and the log header) down.
They are set against what a weight-exchanging federation would send each way per round: the full
model, a LoRA r8 adapter on q/v (the usual PEFT choice), and the trained set itself.

Recipe: fzoo on the last block and the final norm (top1), 16 directions, lr 0.01: bench/learning.py's
fzoo-top1, whose lr was chosen there on held-out train sentences. A top0 recipe (576 numbers) would be
a bad showcase: its trained set is 2.3 KB, smaller than one round of records.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RECIPE = ["method=fzoo", "trainable=top1", "optim.lr=1e-2", "optim.eps=1e-3", "optim.perturbations=16",
          "optim.schedule=constant", "batch_size=16", "max_length=64", "eval_every=0",
          "guard.rise=0"]  # no divergence guard anywhere: a round starts from the log, not the base


def interval(acc: float, n: int) -> str:
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)
    return f"{100 * acc:.1f} % ({100 * (acc - half):.1f}-{100 * (acc + half):.1f})"


def fmt(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def evaluate(spec: dict, from_log: Path | None, dev: Path, n: int) -> float:
    """Dev accuracy of the base model with `from_log` replayed onto it (the federation's log, or a
    single job's): the same code path a round job starts from."""
    from edgezo.data import read_rows
    from edgezo.spec import load_spec
    from edgezo.tasks import make_task
    from edgezo.trainer import build_engine

    spec = load_spec({**spec, "from_log": str(from_log) if from_log else None, "steps": 0})
    engine = build_engine(spec)
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"],
                     engine.device)
    rows = read_rows(dev, "task.eval")[:n]
    return task.evaluate(task.encode(rows, str(dev)), spec["batch_size"])["accuracy"]


def train_alone(spec: dict, train: Path, steps: int, job_dir: Path) -> Path:
    from edgezo.spec import load_spec
    from edgezo.trainer import prepare_job_dir, run_job

    s = load_spec({**spec, "steps": steps, "eval_size": 0, "task": {**spec["task"], "train": str(train)},
                   "name": job_dir.name})
    run_job(prepare_job_dir(job_dir, s))
    return job_dir / "seedlog.ezl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="steps per device per round")
    ap.add_argument("--pool", type=int, default=2400, help="train sentences shared out among the devices")
    ap.add_argument("--dev", type=int, default=300, help="dev sentences every model is scored on")
    ap.add_argument("--set", action="append", default=[], help="override the recipe (key.path=value)")
    ap.add_argument("--out", help="work directory (default: a temporary one)")
    ap.add_argument("--skip-baselines", action="store_true", help="the federation and its bytes only")
    args = ap.parse_args()

    from edgezo import assets, seedlog
    from edgezo.fleet.launch import LocalFleet, split_rows
    from edgezo.spec import DEFAULT_SPEC, apply_sets, load_spec, read_spec_file

    a = assets.fetch(progress=False)
    root = Path(args.out or tempfile.mkdtemp(prefix="edgezo-fleet-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    pool = root / "pool.jsonl"
    pool.write_text("".join(ln + "\n" for ln in Path(a.train).read_text().splitlines()[: args.pool]))
    raw = apply_sets(read_spec_file(DEFAULT_SPEC), RECIPE + args.set)
    raw["task"] = {**raw["task"], "train": str(pool), "eval": str(a.dev), "train_size": None}
    spec = load_spec({**raw, "eval_size": 0})
    (root / "spec.json").write_text(json.dumps(spec))
    shards = split_rows(pool, args.devices, [root / f"shard-{i}" for i in range(args.devices)])
    total = args.devices * args.rounds * args.steps
    t0 = time.monotonic()
    with LocalFleet(root / "fleet", shards, [Path(a.dev)] * args.devices, budget="6GiB") as fleet:
        summary = fleet.run({"rounds": args.rounds, "steps-per-round": args.steps, "spec": str(root / "spec.json"),
                             "round-timeout": 1800.0})
    fed_s = time.monotonic() - t0
    if summary.get("status") != "done":
        print(f"the federation failed: {summary.get('error')}", file=sys.stderr)
        return 1
    log = Path(summary["log"]) / "seedlog.ezl"
    digests = {d: f.get("weights_sha256") for d, f in summary["final"].items()}

    # traffic
    rounds = summary["rounds"]
    up1 = [d["up_bytes"] for d in rounds[0]["devices"].values()]
    up_later = [d["up_bytes"] for r in rounds[1:] for d in r["devices"].values()]
    down1 = [d["down_bytes"] for d in rounds[0]["devices"].values()]
    down2 = [d["down_bytes"] for d in rounds[1]["devices"].values()] if len(rounds) > 1 else []
    down_later = [d["down_bytes"] for r in rounds[2:] for d in r["devices"].values()]
    down_later += [f["down_bytes"] for f in summary["final"].values() if "down_bytes" in f]
    header = seedlog.read(log)[0]
    trained = sum(4 * math.prod(shape) for _, shape in header["params"])
    full = sum(f.stat().st_size for f in Path(a.model_dir).glob("*.safetensors"))
    cfg = json.loads((Path(a.model_dir) / "config.json").read_text())
    hid, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = hid * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    lora = 4 * layers * 8 * ((hid + hid) + (hid + kv))  # r8 on q_proj (hid->hid) and v_proj (hid->kv), fp32

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    per_round = mean(up_later)
    lines = [f"fleet: {args.devices} devices x {args.rounds} rounds x {args.steps} steps ({' '.join(RECIPE[:5])}), "
             f"packaged SmolLM2-135M, {args.pool} train sentences dealt {args.devices} ways, {args.dev} dev; "
             f"federation wall {fed_s / 60:.1f} min",
             f"devices end bit-identical (digest of the replayed weights): {len(set(digests.values())) == 1}", "",
             "| traffic per device | bytes | record upload per round is smaller by |", "|---|---|---|",
             f"| upload, round 1 ({args.steps} records + seed-log header, once) | {fmt(mean(up1))} | |",
             f"| upload, later rounds ({args.steps} records) | {fmt(per_round)} | |",
             f"| download, round 1 (first contact: the spec) | {fmt(mean(down1))} | |",
             f"| download, round 2 (log header + {rounds[0]['records']} merged records) | {fmt(mean(down2))} | |",
             f"| download, later rounds and final ({rounds[-1]['records']} merged records) | {fmt(mean(down_later))} | |",
             f"| full weights (FedAvg of full fine-tuning, each way) | {fmt(full)} | {full / per_round:,.0f}x |",
             f"| LoRA r8 q/v adapter (each way) | {fmt(lora)} | {lora / per_round:,.0f}x |",
             f"| the trained set itself ({spec['trainable']}: {len(header['params'])} tensors) "
             f"| {fmt(trained)} | {trained / per_round:,.0f}x |"]
    print("\n".join(lines), flush=True)
    if args.skip_baselines:
        return 0

    n_dev = args.dev
    rows = [("zero-shot (base model)", evaluate(spec, None, Path(a.dev), n_dev)),
            (f"federated ({total} steps in all, replayed from the federation's log)",
             evaluate(spec, log, Path(a.dev), n_dev))]
    for i, shard in enumerate(shards):
        job = train_alone(spec, shard, total, root / f"alone-{i}")
        rows.append((f"dev-{i} alone on its shard ({total} steps)", evaluate(spec, job, Path(a.dev), n_dev)))
    job = train_alone(spec, pool, total, root / "central")
    rows.append((f"centralised: one device, all {args.pool} sentences ({total} steps)",
                 evaluate(spec, job, Path(a.dev), n_dev)))
    print(f"\n| model | dev accuracy (95 % interval), {n_dev} sentences |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {interval(acc, n_dev)} |")
    print(f"\nwall {(time.monotonic() - t0) / 60:.1f} min; work directory {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
