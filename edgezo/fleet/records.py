"""What crosses the network, and the server's checks on it.

Records travel framed exactly as in a seed-log (`kind:u8 | length:u32 | compact JSON | crc32:u32`),
so a record is checksummed on the wire as on disk. A device's round is accepted only when every
record passes `check_round`: the seeds are the ones the device was given (each step's seeds are a
pure function of its round seed, so the server knows them all in advance: the shared pool, after
FedKSeed, is the set of seeds the server hands out), the scalars are finite, lr and weight decay
are what the federation's spec says, and the device's seed-log header names the same base model,
dtype, noise stream, directions and trainable tensors as the federation's. One bad record leaves
the device's whole round out, with the reason.

Torch-free, except `round_seeds`, which asks the engine for its step-seed function.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib

from edgezo import seedlog
from edgezo.protocol import EdgezoError

_FRAME = struct.Struct("<BI")
_CRC = struct.Struct("<I")
SEED_LIMIT = 2**53  # job seeds stay below this: the spec's integers travel through JSON and YAML
# What must be the same on every device for a record to mean the same update everywhere
HEADER_KEYS = ("base_model_hash", "dtype", "noise", "directions", "rank", "lowrank_tables", "params")
WIRE_FIELDS = ("step", "seeds", "grads", "lr", "wd", "loss")  # what a device sends per step


class RecordError(EdgezoError, ValueError):
    kind, label = "fleet-record", "malformed record"


def encode(records: list[dict], kind: int = seedlog.STEP) -> bytes:
    out = bytearray()
    for rec in records:
        payload = json.dumps(rec, separators=(",", ":"), allow_nan=True).encode()
        head = _FRAME.pack(kind, len(payload))
        out += head + payload + _CRC.pack(zlib.crc32(head + payload))
    return bytes(out)


def decode(blob: bytes, kind: int = seedlog.STEP) -> list[dict]:
    """Every frame of `blob`, or RecordError: a bad checksum, kind or length is not dropped silently."""
    out, off = [], 0
    while off < len(blob):
        if off + _FRAME.size > len(blob):
            raise RecordError(f"truncated frame at byte {off}")
        k, length = _FRAME.unpack_from(blob, off)
        end = off + _FRAME.size + length + _CRC.size
        if end > len(blob):
            raise RecordError(f"frame at byte {off} runs past the end ({length} bytes announced)")
        if zlib.crc32(blob[off:end - _CRC.size]) != _CRC.unpack_from(blob, end - _CRC.size)[0]:
            raise RecordError(f"frame at byte {off}: checksum mismatch")
        if k != kind:
            raise RecordError(f"frame at byte {off} is a {seedlog.KINDS.get(k, k)} record, not a step record")
        try:
            rec = json.loads(blob[off + _FRAME.size:end - _CRC.size])
        except ValueError as e:
            raise RecordError(f"frame at byte {off}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise RecordError(f"frame at byte {off}: a record is a JSON object")
        out.append(rec)
        off = end
    return out


def round_seed(fed_seed: int, rnd: int, device: str) -> int:
    """The job seed of `device` in round `rnd`: every step seed of its round job derives from it.
    A pure function of public values, so the server can check every seed it receives."""
    h = hashlib.sha256(f"edgezo-fleet:{fed_seed}:{rnd}:{device}".encode()).digest()
    return int.from_bytes(h[:8], "little") % SEED_LIMIT


def round_seeds(job_seed: int, steps: int, perturbations: int) -> list[list[int]]:
    """The seeds each step of a round job draws, in order (edgezo.zo.step_seed)."""
    from edgezo.zo import step_seed

    return [[step_seed(job_seed, s, k) for k in range(perturbations)] for s in range(steps)]


def header_subset(header: dict) -> dict:
    return {k: header.get(k) for k in HEADER_KEYS}


def wire_header(header: dict) -> dict:
    """What a device sends of its round job's seed-log header (once): the keys that must match, and
    where it ran (a log replays bit-exactly on the kind of device and torch that wrote it)."""
    return {k: header.get(k) for k in (*HEADER_KEYS, "device", "torch")}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_header(mine: dict, theirs: dict) -> None:
    for k in HEADER_KEYS:
        if theirs.get(k) != mine.get(k):
            what = "base-model hash" if k == "base_model_hash" else k
            raise RecordError(f"wrong {what}: the device's seed-log says {str(theirs.get(k))[:80]!r}, the "
                              f"federation's {str(mine.get(k))[:80]!r}")


def check_round(records: list[dict], *, seeds: list[list[int]], spec: dict) -> list[dict]:
    """The records of one device's round, checked and trimmed to what a merged record keeps, or
    RecordError naming the record and the field at fault."""
    from edgezo.zo import lr_at

    if len(records) != len(seeds):
        raise RecordError(f"expected {len(seeds)} step records, got {len(records)}")
    o = spec["optim"]
    out = []
    for i, (rec, want) in enumerate(zip(records, seeds)):
        where = f"record {i}"
        missing = [f for f in ("step", "seeds", "grads", "lr", "wd") if f not in rec]
        if missing:
            raise RecordError(f"{where}: no {missing[0]} field")
        if rec["step"] != i:
            raise RecordError(f"{where}: step {rec['step']!r}, expected {i}")
        if not rec["seeds"]:
            raise RecordError(f"{where}: an empty step (its loss was not finite on the device)")
        if rec["seeds"] != want:
            bad = next((s for s in rec["seeds"] if s not in want), rec["seeds"])
            raise RecordError(f"{where}: seed {bad!r} is not one of the seeds this device was given for the step")
        if not isinstance(rec["grads"], list) or len(rec["grads"]) != len(want):
            raise RecordError(f"{where}: expected {len(want)} projected gradients, got {rec['grads']!r:.80}")
        bad = [g for g in rec["grads"] if not _finite(g)]
        if bad:
            raise RecordError(f"{where}: projected gradient {bad[0]!r} is not a finite number")
        lr = lr_at(i, o["lr"], len(seeds), o["schedule"])
        if not _finite(rec["lr"]) or rec["lr"] != lr:
            raise RecordError(f"{where}: lr {rec['lr']!r}, the federation's spec gives {lr!r}")
        if not _finite(rec["wd"]) or rec["wd"] != o["weight_decay"]:
            raise RecordError(f"{where}: weight decay {rec['wd']!r}, the spec says {o['weight_decay']!r}")
        out.append({"seeds": rec["seeds"], "grads": rec["grads"], "lr": rec["lr"], "wd": rec["wd"],
                    "loss": rec.get("loss") if _finite(rec.get("loss")) else None})
    return out


def merge(accepted: dict[str, list[dict]], first_step: int, rnd: int) -> list[dict]:
    """One round's merged records, ready for the federation's log.

    Order: by device name, then by step. Floating-point updates do not commute bit for bit, so the
    order must be one every replica computes the same way: names come from each device's own
    configuration and do not depend on which reply arrived first or on the node ids the SuperLink
    hands out at each registration. Scale: each record's lr is divided by the number of devices
    merged, so the round moves the weights by the mean of the devices' updates (FedAvg of the
    deltas; each device ran the same number of steps on the same batch size, so equal weights)."""
    n = len(accepted)
    out = []
    for device in sorted(accepted):
        for k, rec in enumerate(accepted[device]):
            out.append({"step": first_step + len(out), "seeds": rec["seeds"], "grads": rec["grads"],
                        "lr": rec["lr"] / n, "wd": rec["wd"], "r": rnd, "d": device, "k": k})
    return out
