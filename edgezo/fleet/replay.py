"""Start a job from a seed-log (spec field `from_log`): replay its step records onto the freshly
loaded base model before the job's own first step. The trainer calls `apply_log` from build_engine,
so `edgezo run`, a daemon worker, `edgezo resume` and `edgezo replay` all rebuild the same start.

The log must have been written for the same base model, dtype, directions and trainable tensors
(its header says so); its noise stream is the one used, as resume does. Only step records are
allowed: a DiZO projection or a first-order step cannot be redone onto other weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgezo import seedlog


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def apply_log(engine, path: Path) -> str:
    """Redo every step record of the seed-log at `path` on `engine`'s weights; returns its sha256."""
    from edgezo.noise import NoiseUnavailable, make_noise
    from edgezo.trainer import TrainingError, log_header
    from edgezo.zo import StepRecord

    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"from_log: no such seed-log: {path}")
    digest = file_sha256(path)
    header, frames = seedlog.read(path)
    mine = log_header(engine)
    for key in ("base_model_hash", "dtype", "directions", "rank", "lowrank_tables", "params"):
        if header.get(key) != mine.get(key):
            raise TrainingError(f"from_log {path} was written for a different {key.replace('_', ' ')} "
                                f"({str(header.get(key))[:80]} != {str(mine.get(key))[:80]}); refusing to start "
                                "from it")
    if header.get("noise", "torch") != engine.perturber.noise.name:
        try:
            engine.perturber.noise = make_noise(header.get("noise", "torch"), engine.device)
        except NoiseUnavailable as e:
            raise TrainingError(f"from_log {path} was written with the {header.get('noise')} noise stream, and "
                                f"{e}") from None
    live = [f for f in seedlog.effective(frames) if f.kind != seedlog.SNAPSHOT]  # pointers only: replay all
    odd = [f for f in live if f.kind != seedlog.STEP]
    if odd or any(f.data.get("replayable") is False for f in live):
        raise TrainingError(f"from_log {path} holds records other than ZO steps (a DiZO projection or a "
                            "first-order step), which cannot be redone onto these weights")
    for f in live:
        d = f.data
        if d["seeds"]:
            engine.method.apply(StepRecord(step=d["step"], seeds=d["seeds"], grads=d["grads"], lr=d["lr"],
                                           weight_decay=d["wd"]))
    return digest
