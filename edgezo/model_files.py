"""What a local model directory holds, read without torch: tensor names and shapes from the
safetensors headers (8 bytes of header length, then a JSON table of every tensor's name, dtype and
shape), the size of its other files, its HF config. The daemon sizes a job's disk and memory, and
refuses a `trainable` pattern that matches nothing, from these before any worker loads the model.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
_HEADER_MAX = 100 * 1024**2  # a larger "header" is not a safetensors file


class ModelFilesError(ValueError):
    pass


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


def tensor_names(model_dir: Path) -> list[str] | None:
    """Every tensor name in the directory's *.safetensors files; None when there are none or one
    cannot be read (the check is then left to the worker)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    try:
        names = [name for f in files for name, _ in safetensors_shapes(f)]
    except ModelFilesError:
        return None
    return names or None


def default_model_dir() -> Path | None:
    """The packaged model's directory for this user, if fetched (never downloads)."""
    from edgezo.assets import AssetError, default_assets

    try:
        return default_assets().model_dir
    except AssetError:
        return None


def gguf_config(path: Path) -> dict | None:
    """A GGUF file's architecture fields under their HF config names (what policies/memory.py reads);
    None when it cannot be read. The `gguf` package parses the header only (numpy, no torch)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        arch = fields["general.architecture"]
        tensors = {t.name for t in reader.tensors}
    except Exception:  # noqa: BLE001 - an unreadable file falls back like any unknown model
        return None
    names = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
             "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "vocab_size": "vocab_size"}
    cfg = {hf: fields[f"{arch}.{key}"] for hf, key in names.items() if f"{arch}.{key}" in fields}
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in fields:
        cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"])
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    return cfg if "hidden_size" in cfg and "num_hidden_layers" in cfg else None


def model_config(model: str) -> dict | None:
    """The HF config of a local model (a directory's config.json, a .gguf's header, the packaged
    default's directory once fetched); None when there is none to read (the caller falls back)."""
    p = default_model_dir() if model == "default" else Path(model)
    if p is None:
        return None
    if p.is_file() and p.suffix == ".gguf":
        return gguf_config(p)
    cfg_path = p / "config.json" if p.is_dir() else None
    if cfg_path and cfg_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            cfg = json.loads(cfg_path.read_text())
            return cfg.get("text_config", cfg) if isinstance(cfg, dict) else None
    return None


def check_trainable(spec: dict) -> None:
    """A `trainable` list whose pattern matches no parameter of the model is refused now, not after
    a worker has loaded the model (SpecError naming the field and an example name)."""
    from edgezo.spec import SpecError

    patterns = spec["trainable"]
    if not isinstance(patterns, list):
        return
    model_dir = Path(spec["model"]) if spec["model"] != "default" else default_model_dir()
    names = tensor_names(model_dir) if model_dir else None
    for pattern in patterns if names else ():
        if not any(pattern in name for name in names):
            raise SpecError("trainable", f"pattern {pattern!r} matches no parameter of {spec['model']} (a "
                            f"pattern is a part of a name such as {names[len(names) // 2]!r}; or use full, "
                            "topK, lora)")
