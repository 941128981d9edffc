"""What a job takes on disk: measured in its directory, and what its model's files say it will take.

Torch-free (the daemon imports it): a safetensors file starts with 8 bytes of header length and a
JSON table of every tensor's name, dtype and shape, so a model's tensor sizes are known without
loading it. The arithmetic from those sizes to a job's expected disk is in `policies/disk.py`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from edgezo.snapshots import SNAPSHOT_DIR

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
JOURNAL_FILES = ("seedlog.ezl", "events.jsonl")  # what rebuilds the job (and its history)
_HEADER_MAX = 100 * 1024**2  # a larger "header" is not a safetensors file


class ModelFilesError(ValueError):
    pass


def _tree_bytes(path: Path) -> int:
    """Apparent size of a file, or of every file under a directory (links not followed)."""
    try:
        if not path.is_dir():
            return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # deleted while we looked (a snapshot being pruned)
    return total


def job_disk_use(job_dir: Path, output: str | None) -> dict:
    """Bytes a job directory holds now: total, and output / snapshots / seed-log (+ events) / other."""
    job_dir = Path(job_dir)
    out_bytes = _tree_bytes(job_dir / output) if output else 0
    snaps = _tree_bytes(job_dir / SNAPSHOT_DIR)
    journal = sum(_tree_bytes(job_dir / f) for f in JOURNAL_FILES)
    total = _tree_bytes(job_dir)
    count = 0
    if (job_dir / SNAPSHOT_DIR).is_dir():
        count = sum(1 for f in (job_dir / SNAPSHOT_DIR).iterdir() if f.name.startswith("step-"))
    return {"total_bytes": total, "output_bytes": out_bytes, "snapshot_bytes": snaps, "snapshots": count,
            "seedlog_bytes": journal, "other_bytes": max(0, total - out_bytes - snaps - journal)}


def safetensors_shapes(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in a safetensors file, read from its header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ModelFilesError(f"{path}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_MAX:
                raise ModelFilesError(f"{path}: header of {n} bytes; not a safetensors file")
            table = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelFilesError(f"{path}: cannot read its safetensors header ({e})") from None
    if not isinstance(table, dict):
        raise ModelFilesError(f"{path}: the safetensors header is not a table of tensors")
    out = []
    for name, info in table.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ModelFilesError(f"{path}: tensor {name!r} has no valid shape in the header")
        out.append((name, tuple(shape)))
    return out


def model_files(model: str) -> tuple[list[tuple[str, tuple[int, ...]]] | None, int]:
    """(tensor shapes from the model's safetensors headers, or None where there are none (a .gguf,
    an unfetched default); bytes of its other files, which an export writes again: config, tokenizer)."""
    from edgezo.assets import AssetError, resolve_model

    try:
        path = resolve_model(model)
    except AssetError:
        return None, 0
    if not path.is_dir():
        return None, 0
    tensors: list[tuple[str, tuple[int, ...]]] = []
    side = 0
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            tensors.extend(safetensors_shapes(f))
        elif not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            side += f.stat().st_size
    return (tensors or None), side
