"""The seed-log: an append-only, checksummed record of a run, and the job's checkpoint.

Layout: MAGIC, then frames. A frame is `kind:u8 | length:u32 | payload | crc32:u32` where the CRC
covers kind, length and payload; payloads are compact JSON (Python floats round-trip exactly).
The first frame is the header (format, spec hash, base-model hash, dtype, ...). Then one STEP frame
per ZO step, one PROJECTION frame per DiZO projection, a SNAPSHOT frame each time a full copy of
the trainable tensors was written (which bounds replay time), and a ROLLBACK frame when the
guard returned the weights to an earlier step (the frames after that step no longer count; see
`effective`), a CHECK frame each time the guard scored its held-out sentences. A torn tail (power loss mid-write) fails
its length or CRC check: it is dropped with a warning and everything before it stands. A damaged
frame with intact frames after it is not a torn tail but corruption: reading stops with a
SeedLogError that says where, and nothing is dropped or truncated.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgezo.protocol import EdgezoError

MAGIC = b"EDGEZO-SEEDLOG\n"
FORMAT_VERSION = 1
HEADER, STEP, PROJECTION, SNAPSHOT, ROLLBACK, CHECK = 1, 2, 3, 4, 5, 6
KINDS = {HEADER: "header", STEP: "step", PROJECTION: "projection", SNAPSHOT: "snapshot", ROLLBACK: "rollback",
         CHECK: "check"}  # CHECK: a held-out score of the weights after a step (edgezo/guard.py)
_FRAME = struct.Struct("<BI")
_CRC = struct.Struct("<I")


class SeedLogError(EdgezoError, RuntimeError):
    kind, label = "seedlog", "seed-log error"


class TornRecordWarning(UserWarning):
    pass


@dataclass
class Frame:
    kind: int
    data: dict[str, Any]
    offset: int


def _encode(kind: int, data: dict) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), allow_nan=True).encode()
    head = _FRAME.pack(kind, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(head + payload))


def scan(path: Path) -> tuple[list[Frame], int, int]:
    """Read every intact frame. Returns (frames, good_end_offset, file_size)."""
    blob = Path(path).read_bytes()
    if not blob.startswith(MAGIC):
        raise SeedLogError(f"{path} is not an edgezo seed-log (bad magic)")
    frames, off = [], len(MAGIC)
    while off < len(blob):
        if off + _FRAME.size > len(blob):
            break
        kind, length = _FRAME.unpack_from(blob, off)
        end = off + _FRAME.size + length + _CRC.size
        if kind not in KINDS or end > len(blob):
            break
        (crc,) = _CRC.unpack_from(blob, end - _CRC.size)
        if crc != zlib.crc32(blob[off : end - _CRC.size]):
            break
        frames.append(Frame(kind, json.loads(blob[off + _FRAME.size : end - _CRC.size]), off))
        off = end
    if off < len(blob) and (later := _next_intact(blob, off)) is not None:
        raise SeedLogError(f"{path}: the frame at offset {off} is damaged but intact frames follow it (the next "
                           f"at offset {later}), so this is corruption, not a torn tail; nothing was dropped and "
                           f"the file is left as it is. To give up every step from there on (they are redone), "
                           f"`truncate -s {off} {path}` and resume")
    return frames, off, len(blob)


def _next_intact(blob: bytes, bad: int) -> int | None:
    """Offset of the first intact frame that starts after the damaged one at `bad`, if any. Payloads are
    compact JSON, which never holds the bytes 1-5 that start a frame, so few offsets need a CRC."""
    for p in range(bad + 1, len(blob) - _FRAME.size - _CRC.size + 1):
        kind, length = _FRAME.unpack_from(blob, p)
        end = p + _FRAME.size + length + _CRC.size
        if kind in KINDS and end <= len(blob) and \
                _CRC.unpack_from(blob, end - _CRC.size)[0] == zlib.crc32(blob[p : end - _CRC.size]):
            return p
    return None


def read(path: Path) -> tuple[dict, list[Frame]]:
    """Header and body frames; warns (TornRecordWarning) when a torn tail was ignored."""
    frames, good, size = scan(path)
    if good < size:
        warnings.warn(f"{path}: dropped a torn or corrupt tail of {size - good} bytes at offset {good}",
                      TornRecordWarning, stacklevel=2)
    if not frames or frames[0].kind != HEADER:
        raise SeedLogError(f"{path} has no intact header")
    header = frames[0].data
    if header.get("format") != FORMAT_VERSION:
        raise SeedLogError(f"{path}: seed-log format {header.get('format')} is not {FORMAT_VERSION}")
    return header, frames[1:]


class SeedLogWriter:
    """Appends frames; fsyncs every `fsync_every` frames (0: only on close/snapshot)."""

    def __init__(self, path: Path, fsync_every: int = 1):
        self.path = Path(path)
        self.fsync_every = fsync_every
        self._pending = 0
        self._f = None

    @classmethod
    def create(cls, path: Path, header: dict, fsync_every: int = 1) -> SeedLogWriter:
        w = cls(path, fsync_every)
        tmp = w.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + _encode(HEADER, {"format": FORMAT_VERSION, **header}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, w.path)
        _fsync_dir(w.path.parent)
        w._f = open(w.path, "ab")
        return w

    @classmethod
    def reopen(cls, path: Path, fsync_every: int = 1) -> SeedLogWriter:
        """Open for appending after cutting off a torn tail, so new frames follow intact ones."""
        w = cls(path, fsync_every)
        _, good, size = scan(w.path)
        if good < size:
            warnings.warn(f"{path}: dropped a torn or corrupt tail of {size - good} bytes at offset {good}",
                          TornRecordWarning, stacklevel=2)
            with open(w.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        w._f = open(w.path, "ab")
        return w

    def append(self, kind: int, data: dict, *, sync: bool = False) -> None:
        assert self._f is not None
        self._f.write(_encode(kind, data))
        self._pending += 1
        if sync or (self.fsync_every and self._pending >= self.fsync_every):
            self.sync()

    def sync(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._pending = 0

    def close(self) -> None:
        if self._f is not None:
            self.sync()
            self._f.close()
            self._f = None


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def body(frames: list[Frame], kind: int) -> Iterator[dict]:
    return (f.data for f in frames if f.kind == kind)


def effective(frames: list[Frame]) -> list[Frame]:
    """The STEP/PROJECTION/SNAPSHOT frames that make up the current weights: a ROLLBACK frame {"to": t}
    drops every earlier frame of a step after t (the guard returned to the weights after step t)."""
    out: list[Frame] = []
    for f in frames:
        if f.kind == ROLLBACK:
            to = f.data["to"]
            out = [g for g in out if g.data["step"] <= to]
        elif f.kind in (STEP, PROJECTION, SNAPSHOT):
            out.append(f)
    return out


def cut(path: Path, offset: int) -> None:
    """Drop everything from `offset` on (a frame boundary) and fsync: for records that cannot be
    redone and will be written again (method: fo's steps after its newest snapshot)."""
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size > offset:
            f.truncate(offset)
            os.fsync(f.fileno())
