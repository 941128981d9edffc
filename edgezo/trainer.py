"""The training recipe: a plain loop over small pieces (model, task, ZO method, seed-log, meter).

`run_job(job_dir)` is the whole product in one function: it reads `spec.json`, restores the weights
from the job's seed-log if there is one (resume), trains, evaluates, exports and writes
`report.json`. The same function runs in the foreground (`edgezo run`) and inside a daemon worker;
only the hooks differ.

Its length is on purpose (nanoGPT's rule): setup, the loop, evals, snapshots and the report read in one
sitting; the pieces it composes (methods, tasks, seed-log, meter, lease sizes) live in their own modules.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from edgezo import seedlog
from edgezo.data import bucketed_batch, check_fields, data_path, read_rows
from edgezo.disk import job_disk_use
from edgezo.guard import LOSS, DivergenceGuard, Rollback, split_held_out
from edgezo.hizoo import HiZOO
from edgezo.hooks import TrainerHooks
from edgezo.jobdir import write_json_atomic
from edgezo.kerzoo import KerZOO
from edgezo.memory import MEMORY_LOG, MemoryLog, MemoryMeter, release_free_heap
from edgezo.models import load, resolve_device, trainable_patterns, weights_hash
from edgezo.noise import NoiseUnavailable, ZOParam, make_noise, mix
from edgezo.perturb import Perturber, collect_params
from edgezo.prefix import FeatureCache
from edgezo.protocol import CHECK_EVAL, Cancelled, Control, EdgezoError, Event, JobState, Paused, Phase
from edgezo.pseuzo import PseuZO
from edgezo.report import accuracy_gain
from edgezo.snapshots import SNAPSHOT_DIR, SnapshotClock, fsync_dir, keep_count, prune
from edgezo.spec import read_job_spec, spec_hash
from edgezo.tasks import make_task
from edgezo.zo import METHODS, StepRecord, ZOMethod
from policies import memory as mem

ZO_METHODS: dict[str, type[ZOMethod]] = {**METHODS, "kerzoo": KerZOO, "hizoo": HiZOO, "pseuzo": PseuZO}


class TrainingError(EdgezoError, RuntimeError):
    kind, label = "training", "training diverged"


@dataclass
class Engine:
    spec: dict
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    model_path: Path
    params: list[ZOParam]
    perturber: Perturber
    method: ZOMethod
    pending_projections: int = 0  # DiZO projections that were due but deferred (no lease yet)
    guard: DivergenceGuard | None = None
    base: object | None = None  # the trainable tensors' starting values (dizo.Theta0), for rollbacks
    clock: SnapshotClock | None = None  # what a replay since the last snapshot would redo (run_job sets it)
    from_log: str | None = None  # sha256 of spec.from_log, replayed onto the base before step 0


def build_engine(spec: dict) -> Engine:
    device = resolve_device(spec["device"])
    model, tok, path = load(spec["model"], spec["precision"], device)
    if spec["trainable"] == "lora":  # adapters from the job seed, so replay/resume rebuild the same start
        from edgezo.lora import LoraError, wrap

        try:
            model = wrap(model, spec["lora"], spec["seed"])
        except LoraError as e:
            raise TrainingError(str(e)) from None
    elif spec["trainable"] == "scales":  # QZO-style: the int8 layers' row scales, never their codes
        from edgezo.scales import ScalesError, expose

        try:
            expose(model)
        except ScalesError as e:
            raise TrainingError(str(e)) from None
    trainable = spec["trainable"]
    if isinstance(trainable, str) and trainable.startswith("top"):  # the last K blocks + the final norm
        from edgezo.models import decoder_of
        from edgezo.prefix import top_patterns

        try:
            patterns = top_patterns(model, decoder_of(model), int(trainable[3:]))
        except ValueError as e:
            raise TrainingError(str(e)) from None
    else:
        patterns = trainable_patterns(trainable)
    params = collect_params(model, patterns)
    if not params:
        raise TrainingError(f"trainable: no parameter name matches {spec['trainable']}")
    o = spec["optim"]
    try:
        perturber = Perturber(params, make_noise(spec.get("noise", "auto"), device),
                              directions=o.get("directions", "dense"), rank=o.get("rank", 1))
    except NoiseUnavailable as e:
        raise TrainingError(f"noise: {e}") from None
    common = dict(lr=o["lr"], eps=o["eps"], weight_decay=o["weight_decay"], perturbations=o["perturbations"],
                  schedule=o["schedule"], total_steps=spec["steps"], seed=spec["seed"])
    if spec["method"] == "fo":  # the first-order baseline: AdamW through a backward, same loop
        from edgezo.fo import FirstOrder

        method: ZOMethod = FirstOrder(params, perturber, model, lr=o["lr"], weight_decay=o["weight_decay"],
                                      schedule=o["schedule"], total_steps=spec["steps"])
    elif spec["method"] == "dizo":
        from edgezo.dizo import DiZO

        try:
            method: ZOMethod = DiZO(params, perturber, dizo=spec["dizo"], model_path=path, model=model, **common)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    else:  # MeZO and the estimators on its step; a method's own spec section (hizoo, pseuzo) gives its extra arguments
        method = ZO_METHODS[spec["method"]](params, perturber, **spec.get(spec["method"], {}), **common)
    engine = Engine(spec, device, model, tok, path, params, perturber, method)
    g = spec["guard"]
    if g["rise"] > 0 or g["held_out"] > 0:
        from edgezo.dizo import Theta0

        engine.guard = new_guard(spec)
        engine.base = Theta0(path, params)  # read before any resume touches the weights
    if spec.get("from_log"):  # start from a (federation's) seed-log: replayed here, so run, resume and replay agree
        from edgezo.fleet.replay import apply_log

        engine.from_log = apply_log(engine, Path(spec["from_log"]))
    return engine


def new_guard(spec: dict) -> DivergenceGuard:
    g = spec["guard"]
    return DivergenceGuard(rise=g["rise"], span=g["span"], lr_factor=g["lr_factor"], z=g["z"])


def log_header(engine: Engine) -> dict:
    return {
        "spec_hash": spec_hash(engine.spec),
        "base_model_hash": weights_hash(engine.model_path),
        "dtype": engine.spec["precision"],
        "device": engine.device.type,
        "method": engine.spec["method"],
        "noise": engine.perturber.noise.name,
        "directions": engine.perturber.directions,
        "rank": engine.perturber.rank if engine.perturber.directions == "lowrank" else None,
        # embedding tables took low-rank directions too (older lowrank logs: dense tables)
        **({"lowrank_tables": engine.perturber.lowrank_tables} if engine.perturber.directions == "lowrank" else {}),
        "torch": torch.__version__,
        "params": [[p.name, list(p.param.shape)] for p in engine.params],
        "created": time.time(),
        **({"from_log_sha256": engine.from_log} if engine.from_log else {}),
    }


def restore(engine: Engine, log_path: Path, *, use_snapshots: bool = True) -> int:
    """Bring the engine's weights to the last logged step. Returns the next step to run."""
    header, frames = seedlog.read(log_path)
    mine = log_header(engine)
    logged_dirs = (header.get("directions", "dense"), header.get("rank"))  # older logs: dense
    if logged_dirs != (mine["directions"], mine["rank"]):
        def say(kind, rank):
            return f"{kind} directions" + (f" of rank {rank}" if kind == "lowrank" else "")

        raise TrainingError(f"seed-log {log_path} was written with {say(*logged_dirs)}, but the spec asks for "
                            f"{say(mine['directions'], mine['rank'])} (optim.directions/optim.rank, which the "
                            "spec hash covers too): the same seeds would give different directions; refusing "
                            "to resume onto it")
    for key in ("spec_hash", "base_model_hash", "dtype", "from_log_sha256"):
        if header.get(key) != mine.get(key):
            raise TrainingError(f"seed-log {log_path} was written for a different {key.replace('_', ' ')} "
                                f"({header.get(key)} != {mine.get(key)}); refusing to resume onto it")
    if header.get("method") == "fo":
        return _restore_fo(engine, log_path, use_snapshots=use_snapshots)
    if mine["directions"] == "lowrank" and header.get("lowrank_tables", False) != mine["lowrank_tables"]:
        engine.perturber.use_lowrank_tables(header.get("lowrank_tables", False))  # as the log was written
    logged = header.get("noise", "torch")  # logs from before there was a choice used the torch stream
    if logged != mine["noise"]:  # the log's stream wins: the same seeds must give the same directions
        try:
            engine.perturber.noise = make_noise(logged, engine.device)
        except NoiseUnavailable as e:
            raise TrainingError(f"seed-log {log_path} was written with the {logged} noise stream, and {e}; "
                                "replay or resume it where that stream runs") from None
    if header.get("device") != mine["device"]:
        import warnings

        warnings.warn(f"seed-log written on {header.get('device')}, replaying on {mine['device']}: "
                      "the result is close but not bit-identical", stacklevel=2)
    last = -1  # steps are numbered by iteration: a rollback does not reuse numbers
    for f in frames:
        if f.kind == seedlog.STEP:
            if f.data["step"] != last + 1:
                raise TrainingError(f"seed-log {log_path}: step {f.data['step']} follows step {last}")
            last = f.data["step"]
    projections = sum(1 for f in frames if f.kind == seedlog.PROJECTION)
    live = seedlog.effective(frames)  # what the weights are made of, rollbacks taken into account
    begin = 0
    if hasattr(engine.method, "reset_state"):  # a method's own state (HiZOO's H, PseuZO's window) restarts too
        engine.method.reset_state()
    if use_snapshots:  # the newest snapshot whose file survived; frames after it are replayed
        for i in range(len(live) - 1, -1, -1):
            snap = live[i].data
            if live[i].kind == seedlog.SNAPSHOT and (log_path.parent / snap["file"]).is_file():
                if "optim" in snap:  # a stateful ZO method: its state at the snapshot, or no snapshot
                    if not (log_path.parent / snap["optim"]).is_file():
                        continue
                    from safetensors.torch import load_file

                    engine.method.load_state_tensors(load_file(str(log_path.parent / snap["optim"])))
                load_trainable(engine, log_path.parent / snap["file"])
                begin = i + 1
                break
    for f in live[begin:]:
        rec = f.data
        if f.kind == seedlog.STEP and rec["seeds"]:
            engine.method.apply(StepRecord(step=rec["step"], seeds=rec["seeds"], grads=rec["grads"], lr=rec["lr"],
                                           weight_decay=rec["wd"], extra={k: v for k, v in rec.items() if k not in
                                                                          ("step", "seeds", "grads", "lr", "wd", "loss")}))
        elif f.kind == seedlog.PROJECTION:
            from edgezo.dizo import projection_from_frame

            engine.method.apply_projection(projection_from_frame(rec))
    if engine.spec["method"] == "dizo":  # every due projection runs, however late: due so far minus done
        engine.pending_projections = max(0, (last + 1) // engine.spec["dizo"]["interval"] - projections)
    if engine.guard is not None:
        _replay_guard(engine, frames)
    return last + 1


def _replay_guard(engine: Engine, frames: list) -> None:
    """The guard's state after the logged steps: it saw exactly these losses and rollbacks before."""
    guard = new_guard(engine.spec)
    for f in frames:
        if f.kind == seedlog.STEP:
            loss = f.data.get("loss")
            guard.observe(f.data["step"], float("nan") if loss is None else loss)
        elif f.kind == seedlog.CHECK:
            guard.check(f.data["accuracy"], f.data["loss"], f.data.get("correct"), f.data.get("n", 0))
        elif f.kind == seedlog.PROJECTION:
            guard.moved()
        elif f.kind == seedlog.ROLLBACK:
            guard.rolled_back(Rollback(at=f.data["step"], to=f.data["to"], lr_scale=f.data["lr_scale"],
                                       cause=f.data.get("cause", LOSS)))
    engine.guard = guard
    engine.method.lr = engine.spec["optim"]["lr"] * guard.lr_scale


def roll_back(engine: Engine, rb: Rollback, writer, events: EventLog) -> None:
    """Return the weights to the state after step `rb.to` by replaying the seed-log, and slow down."""
    t0 = time.monotonic()
    writer.append(seedlog.ROLLBACK, engine.guard.frame(rb), sync=True)
    with torch.no_grad():
        for p in engine.params:
            p.param.copy_(engine.base.get(p))
    if engine.clock is not None:  # what this restore replays is what a later one would redo
        engine.clock.taken()
    restore(engine, writer.path)  # the ROLLBACK frame is in: the steps after rb.to no longer count,
    # and the guard is rebuilt from the log (rolled back, lr lowered), as a resume would rebuild it
    best = engine.guard.best_check()
    events.emit(Event.ROLLBACK, step=rb.at, to=rb.to, lr=engine.method.lr, cause=rb.cause,
                best_loss=engine.guard.best, best_accuracy=best.accuracy if best else None,
                seconds=time.monotonic() - t0)


def not_replayable_message(job_dir: Path) -> str:
    return (f"{job_dir} was trained with method: fo, and first-order steps are not replayable from the seed-log "
            "(an update needs its gradient, not a few scalars); its trained weights are in the job's output "
            "directory, and its newest snapshot (weights + AdamW state) is under snapshots/ (the seed-log's last "
            "SNAPSHOT record names it); `edgezo resume` continues from there")


def _restore_fo(engine: Engine, log_path: Path, *, use_snapshots: bool) -> int:
    """FO steps cannot be redone from the log: load the newest snapshot whose weights and AdamW state
    both survived, cut the steps logged after it from the log (they are run again), return its step + 1."""
    if not use_snapshots:
        raise TrainingError(not_replayable_message(log_path.parent))
    frames, good, _ = seedlog.scan(log_path)  # frames[0] is the header
    keep, last = (frames[1].offset if len(frames) > 1 else good), -1
    for i in range(len(frames) - 1, 0, -1):
        snap = frames[i].data
        if frames[i].kind != seedlog.SNAPSHOT or "optim" not in snap:
            continue
        weights, optim = log_path.parent / snap["file"], log_path.parent / snap["optim"]
        if weights.is_file() and optim.is_file():
            from safetensors.torch import load_file

            load_trainable(engine, weights)
            engine.method.load_state_tensors(load_file(str(optim)))
            keep, last = (frames[i + 1].offset if i + 1 < len(frames) else good), snap["step"]
            break
    seedlog.cut(log_path, keep)
    return last + 1


def trainable_state(engine: Engine) -> dict[str, torch.Tensor]:
    return {p.name: p.param.detach().cpu().contiguous() for p in engine.params}


def save_trainable(engine: Engine, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(trainable_state(engine) if state is None else state, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_trainable(engine: Engine, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    with torch.no_grad():
        for p in engine.params:
            p.param.copy_(state[p.name])


@contextmanager
def _phase(meter: MemoryMeter, events: EventLog, name: str, what: str | None = None) -> Iterator[None]:
    """A phase the daemon should see (its memory samples are labelled by it): begin/end events.
    `what` tells apart phases of one kind (an eval phase that is the guard's held-out check)."""
    extra = {"what": what} if what else {}
    events.hooks.on_event("phase", {"phase": name, "state": "begin", **extra})
    try:
        with meter.phase(name):
            yield
    finally:
        release_free_heap()  # what the phase freed leaves the process before the daemon looks again
        events.hooks.on_event("phase", {"phase": name, "state": "end", **extra})


class EventLog:
    """events.jsonl in the job dir (survives restarts) plus the supervisor's hooks."""

    def __init__(self, path: Path, hooks: TrainerHooks, verbose: bool = False):
        self.path, self.hooks, self.verbose = path, hooks, verbose

    def emit(self, kind: str, **data) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"t": time.time(), "kind": kind, **data}) + "\n")
        self.hooks.on_event(kind, data)

    def history(self, *kinds: str) -> list[dict]:
        """The logged events of these kinds, in the order they happened (one read of the file)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after power loss
            if ev.get("kind") in kinds:
                out.append(ev)
        return out


def _model_shape(engine: Engine) -> tuple[dict, int]:
    """The loaded model's config as `policies.memory` reads it (with the attention it really runs),
    and the bytes of one activation value: the worker sizes leases with the daemon's estimator."""
    cfg = engine.model.config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    d["attn_implementation"] = getattr(cfg, "_attn_implementation", None) or "eager"
    return d, 2 if engine.spec["precision"] in ("fp16", "bf16") else 4


def eval_lease_bytes(engine: Engine, batch: int, seq: int) -> int:
    """What an eval forward adds over the steady state (policies.memory.eval_extra)."""
    cfg, elem = _model_shape(engine)
    return mem.eval_extra(cfg, batch, seq, elem)


def run_job(job_dir: Path, hooks: TrainerHooks | None = None, *, progress: bool = False) -> dict:
    job_dir = Path(job_dir)
    hooks = hooks or TrainerHooks()
    spec = read_job_spec(job_dir)
    events = EventLog(job_dir / "events.jsonl", hooks, verbose=progress)
    device = resolve_device(spec["device"])
    memory_log = MemoryLog(job_dir / MEMORY_LOG)  # the job's own samples: its plots need no daemon
    meter = MemoryMeter(device=f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu", interval=0.1,
                        on_reading=memory_log.add)
    meter.start()
    try:
        with _phase(meter, events, Phase.LOAD):
            engine = build_engine(spec)
            task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"],
                             engine.device)
            train_path = data_path(spec["task"]["train"], "train")
            eval_path = data_path(spec["task"]["eval"], "eval")
            # the guard's held-out sentences come out of the train split, never out of eval
            train_rows, held_rows = split_held_out(read_rows(train_path, "task.train"), spec["task"]["train_size"],
                                                   spec["guard"]["held_out"])
            eval_rows = read_rows(eval_path, "task.eval")
            # every update from here on is timed, a resume's replay included: it is what a replay redoes
            engine.clock = SnapshotClock.from_spec(spec, torch.cuda.synchronize if engine.device.type == "cuda" else None)
            engine.clock.watch(engine.method)
            fields = {"task.text_field": spec["task"]["text_field"]}
            check_fields(train_rows, fields, str(train_path))
            train = task.encode(train_rows, str(train_path))
            held = task.encode(held_rows, str(train_path)) if engine.guard is not None else []
            first = [train[i] for i in bucketed_batch([len(e.ids) for e in train], spec["batch_size"], 0, spec["seed"])]
            if getattr(engine.method, "replayable", True):  # fo runs one forward a step: nothing to share
                task.prefix = shared_prefix(engine, task, first, events)
                if task.prefix is not None and task.prefix.cut == task.prefix.blocks and spec["task"]["type"] == "classification":
                    # no block trains: a sentence seen once needs no forward again (held-out ones too)
                    task.features = FeatureCache(len(train) + len(held))
            evalset = task.encode(eval_rows[: spec["eval_size"]], str(eval_path)) if spec["eval_size"] else []
            log_path = job_dir / "seedlog.ezl"
            (job_dir / SNAPSHOT_DIR).mkdir(exist_ok=True)
            if log_path.exists():
                start = restore(engine, log_path)
                writer = seedlog.SeedLogWriter.reopen(log_path, spec["fsync_every"])
                if engine.guard is not None and engine.guard.pending is not None:  # killed between trip and rollback
                    roll_back(engine, engine.guard.pending, writer, events)
            else:
                start = 0
                writer = seedlog.SeedLogWriter.create(log_path, log_header(engine), spec["fsync_every"])
        report = _train(engine, task, train, held, evalset, writer, events, meter, hooks, start, job_dir, progress)
    finally:
        meter.stop()
        memory_log.flush()
    return report


def shared_prefix(engine: Engine, task, batch, events: EventLog):
    """A prefix cache when the blocks below the trainable ones are frozen (edgezo/prefix.py), after
    checking on one batch that a shared perturbed forward gives the full one's loss bit for bit."""
    from edgezo.models import decoder_of
    from edgezo.prefix import PrefixCache, decoder_layers, first_trainable_layer

    decoder = decoder_of(engine.model)
    cut = first_trainable_layer(decoder, engine.params)
    if cut == 0 or not batch:
        return None
    seed, eps = mix(engine.spec["seed"], 0x5EED), engine.spec["optim"]["eps"]
    with torch.no_grad(), engine.perturber.active(seed, eps):
        full = task.objective(batch)
    task.prefix = PrefixCache(decoder, cut)
    objective = task.step_objective(batch)
    with torch.no_grad(), engine.perturber.active(seed, eps):
        shared = objective()
    objective.done()
    task.prefix = None
    if shared != full:
        import warnings

        warnings.warn(f"frozen-prefix sharing gave loss {shared!r} where the full forward gives {full!r}; "
                      "running every forward in full", stacklevel=2)
        return None
    events.emit(Event.PREFIX, frozen_blocks=cut, blocks=len(decoder_layers(decoder)))
    return PrefixCache(decoder, cut)


def _evaluate(task, evalset, spec, meter, step: int, events: EventLog, tag: str) -> dict:
    if events.verbose:
        print(f"eval ({tag.replace('_', '-')}) on {len(evalset)} examples at step {step} ...", file=sys.stderr,
              flush=True)
    with _phase(meter, events, Phase.EVAL):
        metrics = task.evaluate(evalset, spec["batch_size"])
    events.emit(Event.EVAL, step=step, tag=tag, metrics=metrics)
    if events.verbose:
        print("  " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("n", "correct")),
              file=sys.stderr, flush=True)
    return metrics


def _check(engine: Engine, task, held, writer, events: EventLog, meter: MemoryMeter, hooks: TrainerHooks,
           lease_bytes: int, step: int) -> None:
    """Score the held-out train sentences on the current weights (an eval's memory, leased like one),
    log it, and roll back when the guard says so. It always runs when due, waiting for its lease:
    what it decides changes the weights, so a resumed run must take the same decision."""
    guard = engine.guard
    while not hooks.try_lease(Phase.EVAL, lease_bytes):
        _wait_for_lease(hooks, writer, events, step)
    try:
        with _phase(meter, events, Phase.EVAL, what=CHECK_EVAL):
            metrics = task.evaluate(held, engine.spec["batch_size"], kept=True)
    finally:
        hooks.release_lease(Phase.EVAL)
    at, score = guard.at, metrics.get("accuracy", metrics.get("f1"))  # generation: token F1
    correct = metrics.get("correct")  # which sentences it got right: the guard compares checks paired
    writer.append(seedlog.CHECK, {"step": at, "accuracy": score, "loss": metrics["loss"], "n": metrics["n"],
                                  **({"correct": correct} if correct else {})}, sync=True)
    rb = guard.check(score, metrics["loss"], correct, metrics["n"])
    best = guard.best_check()
    events.emit(Event.CHECK, step=at, accuracy=score, loss=metrics["loss"], n=metrics["n"],
                best_step=best.step, best_accuracy=best.accuracy)
    if rb is not None:
        roll_back(engine, rb, writer, events)


def _train(engine: Engine, task, train, held, evalset, writer, events: EventLog, meter: MemoryMeter,
           hooks: TrainerHooks, start: int, job_dir: Path, progress: bool) -> dict:
    spec = engine.spec
    total, bs = spec["steps"], spec["batch_size"]
    lengths = [len(e.ids) for e in train]
    resumed = start > 0
    # method: fo holds one lease, for its whole run (every step is heavy; it covers the evals too).
    fo = not getattr(engine.method, "replayable", True)
    step_phase = Phase.FO_STEP if fo else Phase.ZO_STEP
    events.emit(Event.START, steps_total=total, resumed_from=start, device=str(engine.device),
                trainable_params=sum(p.param.numel() for p in engine.params), step_phase=step_phase)
    evals = {e["tag"]: e["metrics"] for e in events.history(Event.EVAL) if e.get("tag") in ("zero_shot", "final")}
    if evalset and "zero_shot" not in evals and not resumed:
        evals["zero_shot"] = _evaluate(task, evalset, spec, meter, 0, events, "zero_shot")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=spec["name"], unit="step", dynamic_ncols=True)
    eval_due = False
    proj_due = engine.pending_projections
    lease_bytes = eval_lease_bytes(engine, bs, spec["max_length"])
    tensor_loss = getattr(engine.method, "tensor_loss", False)  # FO descends task.loss, ZO compares objectives
    t0, done_here = time.monotonic(), 0
    step = start
    fo_leased = False
    try:
        if fo and step < total:
            fo_bytes = fo_lease_bytes(engine, bs, spec["max_length"])
            while not hooks.try_lease(Phase.FO_STEP, fo_bytes):
                _wait_for_lease(hooks, writer, events, step)
            fo_leased = True
        if task.features is not None and start:  # the features the skipped steps kept, recomputed in order
            with meter.phase(Phase.LOAD):
                for s in range(start):
                    task.warm_features([train[i] for i in bucketed_batch(lengths, bs, s, spec["seed"])])
        every = spec["guard"]["check_every"]

        def check_due(step: int) -> bool:  # the start, and every `every` steps; never twice on the same weights
            return bool(held) and not engine.guard.checked() and (step == 0 or (every and step % every == 0))

        if check_due(step) and step < total:
            _check(engine, task, held, writer, events, meter, hooks, lease_bytes, step)
        while step < total:
            if _obey(hooks, writer, events, step) == Control.FINISH:
                break
            batch = [train[i] for i in bucketed_batch(lengths, bs, step, spec["seed"])]
            objective = task.step_objective(batch)
            t_step = time.perf_counter()
            with meter.phase(step_phase):
                rec = engine.method.step(step, objective.loss if tensor_loss else objective)
            if fo:  # not replayable: redoing an FO step means running it again
                engine.clock.add(time.perf_counter() - t_step)
            objective.done()
            finite = all(math.isfinite(g) for g in rec.grads) and math.isfinite(rec.loss)
            if not finite and (engine.guard is None or not engine.guard.can_roll_back):
                raise TrainingError(f"step {step}: the loss is not finite (lr {rec.lr}"
                                    + ("" if fo else f", eps {spec['optim']['eps']}")
                                    + "); lower optim.lr or check the data")
            if fo:  # a journal entry, not a redo: FO steps resume from snapshots (see _restore_fo)
                writer.append(seedlog.STEP, {"step": step, "method": "fo", "replayable": False, "lr": rec.lr,
                                             "wd": rec.weight_decay, "loss": rec.loss})
            elif finite:
                writer.append(seedlog.STEP, {"step": step, "seeds": rec.seeds, "grads": rec.grads, "lr": rec.lr,
                                             "wd": rec.weight_decay, "loss": rec.loss, **rec.extra})
            else:  # logged as a step that changes nothing; the rollback below undoes what it did
                writer.append(seedlog.STEP, {"step": step, "seeds": [], "grads": [], "lr": rec.lr,
                                             "wd": rec.weight_decay, "loss": None})
            rb = engine.guard.observe(step, rec.loss if finite else float("nan")) if engine.guard else None
            if rb is not None:
                roll_back(engine, rb, writer, events)
            done_here += 1
            rate = done_here / max(1e-9, time.monotonic() - t0)
            events.emit(Event.STEP, step=step, loss=rec.loss, lr=rec.lr, steps_per_s=rate, forwards=objective.cost())
            if bar is not None:
                bar.set_postfix(loss=f"{rec.loss:.4f}", refresh=False)
                bar.update(1)
            if getattr(engine.method, "projection_due", None) and engine.method.projection_due(step):
                proj_due += 1
            if proj_due and _maybe_project(engine, task, batch, step, writer, events, meter, hooks):
                proj_due -= 1
            step += 1
            if step < total and engine.clock.due(step):
                _snapshot(engine, writer, job_dir, step - 1, events)
            if step < total and check_due(step):
                _check(engine, task, held, writer, events, meter, hooks, lease_bytes, step)
            if evalset and spec["eval_every"] and step % spec["eval_every"] == 0 and step < total:
                eval_due = True
            if evalset and step < total and hooks.eval_wanted(step):
                eval_due = True
            if eval_due and (fo or hooks.try_lease(Phase.EVAL, lease_bytes)):
                try:
                    _evaluate(task, evalset, spec, meter, step, events, "periodic")
                finally:
                    if not fo:
                        hooks.release_lease(Phase.EVAL)
                eval_due = False
        # Nothing left to overlap with: wait for the leases, never drop a due projection or the final eval.
        while proj_due and step > 0:
            batch = [train[i] for i in bucketed_batch(lengths, bs, step - 1, spec["seed"])]
            if _maybe_project(engine, task, batch, step - 1, writer, events, meter, hooks):
                proj_due -= 1
            else:
                _wait_for_lease(hooks, writer, events, step)
        if held and step > 0:  # the job ends on its best held-out check: the last weights are checked too
            if not engine.guard.checked():
                _check(engine, task, held, writer, events, meter, hooks, lease_bytes, step)
            rb = engine.guard.settle()
            if rb is not None:
                roll_back(engine, rb, writer, events)
        while evalset and not fo and not hooks.try_lease(Phase.EVAL, lease_bytes):
            _wait_for_lease(hooks, writer, events, step)
    except BaseException:
        if fo_leased:
            hooks.release_lease(Phase.FO_STEP)
        raise
    finally:
        if bar is not None:
            bar.close()
        writer.sync()

    try:
        if evalset:
            try:
                evals["final"] = _evaluate(task, evalset, spec, meter, total, events, "final")
            finally:
                if not fo:
                    hooks.release_lease(Phase.EVAL)
    finally:
        if fo_leased:
            hooks.release_lease(Phase.FO_STEP)
    with _phase(meter, events, Phase.EXPORT):
        export(engine, job_dir / spec["output"])
    writer.close()
    wall = time.monotonic() - t0
    report = build_report(spec, job_dir, evals, events, meter, step, wall, done_here, engine.perturber.noise.name)
    if hasattr(engine.method, "state_bytes"):  # what a stateful ZO method keeps beyond MeZO (HiZOO's H, PseuZO's window)
        report["memory"]["method_state_bytes"] = engine.method.state_bytes()
    write_json_atomic(job_dir / "report.json", report)
    events.emit(Event.DONE, report={k: report[k] for k in ("status", "steps_done", "metrics")})
    return report


def export(engine: Engine, out: Path) -> None:
    """The trained model in the form its users load: a peft adapter for LoRA, a bitsandbytes int8
    checkpoint for trained scales, else a full transformers model directory; tokenizer alongside."""
    if engine.spec["trainable"] == "lora":  # PeftModel.from_pretrained(base, out)
        from edgezo.lora import save_adapter

        save_adapter(engine.model, out)
    elif engine.spec["trainable"] == "scales":  # AutoModelForCausalLM.from_pretrained(out)
        from edgezo.scales import save_int8

        save_int8(engine.model, out)
    else:
        engine.model.save_pretrained(out)
    engine.tokenizer.save_pretrained(out)


def _obey(hooks: TrainerHooks, writer, events: EventLog, step: int) -> str:
    """Pause or stop at a step boundary when the supervisor says so; the seed-log is the checkpoint."""
    action = hooks.control()
    if action == Control.FINISH:
        events.emit(Event.FINISH, step=step)
    if action in (Control.PAUSE, Control.STOP):
        writer.sync()
        events.emit(Event.PAUSED if action == Control.PAUSE else Event.CANCELLED, step=step)
        raise Paused(step) if action == Control.PAUSE else Cancelled(step)
    return action


def _wait_for_lease(hooks: TrainerHooks, writer, events: EventLog, step: int) -> None:
    _obey(hooks, writer, events, step)
    time.sleep(0.2)


def _maybe_project(engine: Engine, task, batch, step: int, writer, events: EventLog, meter: MemoryMeter,
                   hooks: TrainerHooks) -> bool:
    """Run DiZO's projection if its memory is available now. False: deferred to a later step."""
    from edgezo.dizo import projection_frame

    method = engine.method
    lease = projection_lease_bytes(engine, len(batch), engine.spec["max_length"], meter) if method.heavy else 0
    if method.heavy and not hooks.try_lease(Phase.PROJECTION, lease):
        return False
    try:
        with _phase(meter, events, Phase.PROJECTION):
            before = task.objective(batch)
            rec = method.project(step, lambda: task.objective(batch), lambda: task.loss(batch))
            rec.loss_before, rec.loss_after = before, task.objective(batch)
    finally:
        if method.heavy:
            hooks.release_lease(Phase.PROJECTION)
    writer.append(seedlog.PROJECTION, projection_frame(rec))
    if engine.guard is not None:
        engine.guard.moved()
    events.emit(Event.PROJECTION, step=step, mode=rec.mode, loss_before=rec.loss_before, loss_after=rec.loss_after,
                ratios=[g / n if n else 1.0 for _, g, n in rec.layers])
    return True


def projection_lease_bytes(engine: Engine, batch: int, seq: int, meter: MemoryMeter | None = None) -> int:
    """What an FO projection adds over the steady state (policies.memory.projection_extra). With
    `meter` and a projection already measured, the measurement wins: that phase's peak over the
    steady (zo_step) average, plus 10 % — the estimate is only for the first phase."""
    if not getattr(engine.method, "heavy", False):
        return 0
    if meter is not None:
        phases = meter.summary().get("phases", {})
        proj, steady = phases.get(Phase.PROJECTION), phases.get(Phase.ZO_STEP)
        if proj and steady and proj.get("peak_bytes"):
            return max(int(1.1 * (proj["peak_bytes"] - steady.get("avg_bytes", 0))), 0)
    cfg, elem = _model_shape(engine)
    return mem.projection_extra(cfg, batch, seq, elem, bool(engine.spec.get("dizo", {}).get("checkpointing")))


def fo_lease_bytes(engine: Engine, batch: int, seq: int) -> int:
    """What a method: fo run holds over the loaded model for its whole run (policies.memory.fo_extra),
    with the trainable tensors' real size."""
    cfg, elem = _model_shape(engine)
    trainable = sum(p.param.numel() * p.param.element_size() for p in engine.params)
    return mem.fo_extra(cfg, batch, seq, elem, trainable)


def _snapshot(engine: Engine, writer, job_dir: Path, step: int, events: EventLog) -> None:
    """Write the trainable tensors (+ AdamW state for fo), make the files and their seed-log record
    durable, and only then delete all but the newest `snapshot.keep`: a crash at any point leaves
    a snapshot the log points at (or none, when there was none before)."""
    t0 = time.monotonic()
    name = f"{SNAPSHOT_DIR}/step-{step:08d}.safetensors"
    record = {"step": step, "file": name}
    state_tensors = getattr(engine.method, "state_tensors", None)
    if state_tensors is not None:  # method: fo: the AdamW moments, without which resume would diverge
        record["optim"] = f"{SNAPSHOT_DIR}/optim-{step:08d}.safetensors"
        save_trainable(engine, job_dir / record["optim"], state_tensors())
    save_trainable(engine, job_dir / name)
    fsync_dir(job_dir / SNAPSHOT_DIR)  # the renames into place
    writer.append(seedlog.SNAPSHOT, record, sync=True)
    deleted = prune(job_dir, keep_count(engine.spec))
    nbytes = sum((job_dir / record[k]).stat().st_size for k in ("file", "optim") if k in record)
    events.emit(Event.SNAPSHOT, step=step, bytes=nbytes, deleted=len(deleted), replay_s=engine.clock.debt_s,
                seconds=time.monotonic() - t0)
    engine.clock.taken()


def build_report(spec: dict, job_dir: Path, evals: dict, events: EventLog, meter: MemoryMeter, steps_done: int,
                 wall: float, steps_here: int, noise: str) -> dict:
    logged = events.history(Event.EVAL, Event.ROLLBACK, Event.CHECK)
    history = [{"step": e["step"], **{k: v for k, v in e["metrics"].items() if k != "correct"}}
               for e in logged if e["kind"] == Event.EVAL]
    guard_trail = [{"cause": LOSS, **e} if e["kind"] == Event.ROLLBACK else e
                   for e in logged if e["kind"] != Event.EVAL]
    rollbacks = [{k: e[k] for k in ("step", "to", "lr", "cause", "best_loss", "best_accuracy") if k in e}
                 for e in guard_trail if e["kind"] == Event.ROLLBACK]
    return {
        "name": spec["name"],
        "status": JobState.DONE,
        "steps_done": steps_done,
        "steps_total": spec["steps"],
        "method": spec["method"],
        "model": spec["model"],
        "precision": spec["precision"],
        "noise": noise,  # the stream the seed-log pins (the spec may say auto)
        "metrics": {"zero_shot": evals.get("zero_shot"), "final": evals.get("final"), "history": history,
                    "gain": accuracy_gain(evals.get("zero_shot"), evals.get("final"))},
        "timing": {"wall_s": wall, "steps_this_run": steps_here,
                   "steps_per_s": steps_here / wall if wall > 0 else None},
        "memory": meter.summary(),
        "guard": {"rollbacks": len(rollbacks), "events": rollbacks,  # never a silent return to worse weights
                  "held_out": held_out_summary(guard_trail)},
        "output": str(job_dir / spec["output"]),
        "disk": job_disk_use(job_dir, spec["output"]),  # what the job leaves on disk, by kind
    }


def held_out_summary(trail: list[dict]) -> dict | None:
    """The guard's held-out scores: at the start, and of the weights the job ended on (`end`, after
    step `end_step`). `trail` is the job's check and rollback events in order: the job ended on its
    last check's weights, or on those a later return went back to (a checked step)."""
    checks = [e for e in trail if e["kind"] == Event.CHECK]
    if not checks:
        return None
    scored = {}  # step -> the latest check of the weights after it
    end = None
    for e in trail:
        if e["kind"] == Event.CHECK:
            scored[e["step"]] = end = e
        elif e["to"] in scored:  # a rollback to checked weights (held-out and end returns always are)
            end = scored[e["to"]]
        else:  # a loss return to unchecked weights: the trainer checks them before the job ends
            end = None
    end = end or checks[-1]
    return {"n": checks[0]["n"], "checks": len(checks), "start": checks[0]["accuracy"],
            "end": end["accuracy"], "end_step": end["step"]}


def prepare_job_dir(job_dir: Path, spec: dict) -> Path:
    """Create the job directory with its spec; refuses to mix a different spec into an existing job."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    spec_file = job_dir / "spec.json"
    if spec_file.exists():
        old = json.loads(spec_file.read_text())
        if spec_hash(old) != spec_hash(spec):
            raise TrainingError(f"{job_dir} already holds a job with a different spec; use another --job-dir "
                                "or `edgezo resume` to continue it")
    write_json_atomic(spec_file, spec)
    return job_dir
