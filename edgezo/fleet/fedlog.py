"""The federation's log: a job directory (spec.json + seedlog.ezl) whose seed-log holds every merged
record, numbered 0, 1, 2, ... across rounds. `edgezo replay DIR --out M` rebuilds the federated model
from it anywhere the base model is; a device joining late catches up by replaying it.

The server writes it; every device keeps a copy, extended with what the server sends each round,
so its copy is byte-for-byte the server's records (the headers differ only in `created`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgezo import seedlog
from edgezo.fleet import records as rec_mod
from edgezo.jobdir import SEEDLOG, SPEC, write_json_atomic


class FedLog:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.path = self.dir / SEEDLOG
        self.header: dict | None = None
        self.records: list[dict] = []
        if self.path.exists():
            header, frames = seedlog.read(self.path)
            self.header = header
            self.records = [f.data for f in frames if f.kind == seedlog.STEP]

    @property
    def steps(self) -> int:
        return len(self.records)

    @property
    def spec(self) -> dict | None:
        p = self.dir / SPEC
        return json.loads(p.read_text()) if p.exists() else None

    def create(self, spec: dict, header: dict) -> None:
        """A fresh log (anything there before is replaced): the federation's spec and header."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        write_json_atomic(self.dir / SPEC, spec)
        header = {k: v for k, v in header.items() if k != "format"}
        seedlog.SeedLogWriter.create(self.path, header).close()
        self.header, self.records = seedlog.read(self.path)[0], []

    def append(self, records: list[dict]) -> None:
        """Records numbered from the current count on; made durable before returning."""
        for i, r in enumerate(records):
            if r["step"] != self.steps + i:
                raise rec_mod.RecordError(f"merged record {i} is step {r['step']}, expected {self.steps + i}")
        w = seedlog.SeedLogWriter.reopen(self.path, fsync_every=0)
        for r in records:
            w.append(seedlog.STEP, r)
        w.close()
        self.records.extend(records)

    def truncate(self, steps: int) -> None:
        """Keep the first `steps` records (a device whose last reply was lost gets them again)."""
        if steps >= self.steps:
            return
        _, frames = seedlog.read(self.path)
        body = [f for f in frames if f.kind == seedlog.STEP]
        seedlog.cut(self.path, body[steps].offset)
        self.records = self.records[:steps]

    def frames_since(self, start: int) -> bytes:
        """The records from `start` on, framed for the wire."""
        return rec_mod.encode(self.records[start:])

    def copy_to(self, path: Path) -> Path:
        """An immutable copy for a round job's `from_log` (the live log grows under it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        shutil.copyfile(self.path, tmp)
        tmp.replace(path)
        return path
