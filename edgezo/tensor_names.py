"""Parameter names of a local model directory, read from its safetensors headers without torch: the
daemon uses them to refuse at enqueue a `trainable` pattern that matches nothing (the worker would
only find out after loading the model)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON; anything larger is not one


def tensor_names(model_dir: Path) -> list[str] | None:
    """Every tensor name in the directory's *.safetensors files; None when there are none or one
    cannot be read (the check is then left to the worker)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    if not files:
        return None
    names: list[str] = []
    try:
        for f in files:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > _MAX_HEADER:
                    return None
                header = json.loads(fh.read(size))
            names += [k for k in header if k != "__metadata__"]
    except (OSError, ValueError, struct.error):
        return None
    return names
