"""Rows from CSV / JSONL / `datasets` directories, and the deterministic order batches are drawn in."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path


class DataError(ValueError):
    pass


def data_path(value: str, split: str) -> Path:
    if value == "default":
        from edgezo import assets

        return assets.resolve_data("default", split)
    p = Path(value).expanduser()
    if not p.exists():
        raise DataError(f"task.{split}: no such data file or directory: {p}")
    return p


def read_rows(path: Path, field_name: str) -> list[dict]:
    """All rows of a CSV, JSONL/JSON or `save_to_disk` directory, as dicts."""
    path = Path(path)
    try:
        if path.is_dir():
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            rows = [dict(r) for r in ds]
        elif path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        elif path.suffix in (".jsonl", ".json"):
            text = path.read_text()
            if path.suffix == ".json" and text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raise DataError(f"{field_name}: {path} is not .csv, .jsonl, .json or a datasets directory")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{field_name}: cannot parse {path}: {e}") from None
    if not rows:
        raise DataError(f"{field_name}: {path} holds no rows")
    return rows


def check_fields(rows: list[dict], fields: dict[str, str], where: str) -> None:
    """Every spec field (text/label/answer/template fields) must exist in the data."""
    have = set(rows[0])
    for spec_field, column in fields.items():
        if column not in have:
            raise DataError(f"{spec_field}: column '{column}' is not in {where} (columns: {', '.join(sorted(have))})")


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch for `step`: epochs are seeded permutations, a pure function of step.

    Being pure is what lets a resumed job see exactly the batches the killed one would have seen.
    """
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = _permutation(n, seed, epoch)
        take = min(batch_size - len(out), n - pos)
        out.extend(perm[pos : pos + take])
    return out


_perm_cache: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _perm_cache:
        if len(_perm_cache) > 4:
            _perm_cache.clear()
        perm = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(perm)
        _perm_cache[key] = perm
    return _perm_cache[key]
