"""A trained transformers model written as a GGUF file that llama.cpp, ollama and transformers load.

Everything that is not a trained weight comes from the base model's GGUF: every metadata field
(the architecture's hyper-parameters, the tokenizer's vocabulary, merges, special ids and chat
template) and the order of the tensors, so the result is a drop-in replacement for the base file.
Only ``general.file_type`` changes, to say what the new file holds.

Tensor names and layouts are the exact inverse of transformers' GGUF loader: its own name map
(gguf's TensorNameMap) read backwards, and, for ``llama``, llama.cpp's q/k row permutation (the
loader undoes it; rotary pairs are interleaved in GGUF and split in halves in transformers).
Architectures whose loader reshapes tensors in other ways are refused rather than guessed.
1-D tensors (norms, biases) stay F32; matrices become F16 or Q8_0 (Q8_0 needs rows that are a
multiple of 32 long; other rows fall back to F16, as llama.cpp's converter does).
Base tensors transformers does not load (e.g. ``rope_freqs``) are copied from the base unchanged.

The file is written next to its destination under a temporary name, one tensor at a time (never
the whole model twice in memory), fsynced and renamed into place: a crash leaves no half file.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QUANTS", "GGUFExportError", "dense_state", "gguf_metadata", "write_gguf"]

from edgezo.export import QUANTS


class GGUFExportError(RuntimeError):
    """The model cannot be written as GGUF against this base; the message says why and what to pass."""


@dataclass
class _Planned:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy order (rows last-but-one), as the writer wants it
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    source: str | None  # the transformers tensor it is made from; None: copied from the base
    raw: Any = None  # the base tensor (gguf ReaderTensor) when copied


def _qtypes(quant: str):
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    table = {"f16": (Q.F16, F.MOSTLY_F16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}
    if quant not in table:
        raise GGUFExportError(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    return table[quant]


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Every key/value field of a GGUF file (the header's own counts left out), for checks and tests."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dense_state(model) -> dict[str, Any]:
    """The model's tensors by transformers name, as plain float tensors: LLM.int8 layers are
    dequantised (codes × row scales / 127, the trained scales for `trainable: scales` jobs)."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear8bitLt":
            continue
        from peft.utils.integrations import dequantize_bnb_weight

        prefix = name + "."
        for key in [k for k in state if k.startswith(prefix) and k != prefix + "bias" and "." not in k[len(prefix):]]:
            del state[key]  # codes, SCB, weight_format, edgezo's weight_scale
        state[prefix + "weight"] = dequantize_bnb_weight(module.weight, module.state)
    return state


def _permuter(arch: str):
    """What to apply to a tensor before writing it, so that transformers' loader gets it back as is."""
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            LlamaTensorProcessor,
            TensorProcessor,
        )
    except ImportError as e:
        import transformers

        raise GGUFExportError(f"transformers {transformers.__version__} lacks the GGUF tensor map edgezo inverts "
                              f"({e}); upgrade transformers, or export --format safetensors") from None

    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if processor is TensorProcessor:
        return processor, None
    if processor is LlamaTensorProcessor:
        return processor, _llama_permute
    raise GGUFExportError(
        f"GGUF export writes architectures transformers loads by renaming only, and llama; this base is "
        f"{arch!r}, whose loader applies {processor.__name__}, which edgezo does not invert; "
        "export --format safetensors and convert it with llama.cpp's convert_hf_to_gguf.py")


def _llama_permute(w: np.ndarray, gguf_name: str, heads: int, kv_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute(): per head, rows [first half | second half] become
    interleaved pairs. transformers' LlamaTensorProcessor reverses exactly this (same test on names)."""
    if ".attn_q." in gguf_name:
        n = heads
    elif ".attn_k." in gguf_name:
        n = kv_heads
    else:
        return w
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(model, processor_cls, config: dict) -> dict[str, str]:
    """GGUF tensor name -> transformers name, exactly as transformers' loader pairs them."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    try:
        return get_gguf_hf_weights_map(model, processor_cls(config=config))
    except NotImplementedError as e:
        raise GGUFExportError(f"gguf has no tensor name map for this model: {e}") from None


def _byte_size(shape: tuple[int, ...], qtype) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    return int(np.prod(quant_shape_to_byte_shape(shape, qtype)))


def _plan(reader, state: dict, names: dict[str, str], qtype, base: Path, tied: bool) -> list[_Planned]:
    from gguf import GGMLQuantizationType as Q

    plan, used = [], set()
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        hf = names.get(t.name)
        if hf is None or hf not in state:
            plan.append(_Planned(t.name, shape, t.tensor_type, int(t.n_bytes), None, t))
            continue
        have = tuple(state[hf].shape)
        if have != shape:
            raise GGUFExportError(
                f"base GGUF {base}: tensor {t.name} has shape {list(shape)}, but the trained model's {hf} has "
                f"{list(have)}; the base GGUF must be a GGUF of the job's base model (same architecture and size)")
        if len(shape) == 1:
            want = Q.F32
        elif qtype == Q.Q8_0 and shape[-1] % 32:
            want = Q.F16  # Q8_0 packs rows in blocks of 32
        else:
            want = qtype
        plan.append(_Planned(t.name, shape, want, _byte_size(shape, want), hf))
        used.add(hf)
    left = sorted(set(state) - used)
    if tied:  # the tied output head is the embedding; a base without output.weight ties it too
        left = [k for k in left if k.rsplit(".", 1)[0] not in ("lm_head",)]
    if left:
        raise GGUFExportError(
            f"the trained model has tensors the base GGUF {base} has no place for: {', '.join(left[:5])}"
            + (f" (+{len(left) - 5} more)" if len(left) > 5 else "")
            + "; the base GGUF must be a GGUF of the job's base model")
    return plan


def _data(p: _Planned, state: dict, permute, arch_heads: tuple[int, int]) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if p.source is None:
        return np.asarray(p.raw.data)
    w = state[p.source].detach().float().cpu().contiguous().numpy()
    if permute is not None:
        w = permute(w, p.name, *arch_heads)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if p.qtype == Q.F32:
        return w
    if p.qtype == Q.F16:
        out = w.astype(np.float16)
        if not np.isfinite(out).all():
            raise GGUFExportError(f"{p.source} has values beyond fp16's range (±65504); export --quant q8_0")
        return out
    return quantize(w, p.qtype)


def write_gguf(model, base: Path, out: Path, quant: str = "f16", *, progress: bool = False) -> dict[str, Any]:
    """Write `model` (a plain transformers CausalLM, LoRA already merged) as GGUF at `out`, taking the
    metadata and tensor order from the GGUF `base`. Returns a summary (path, bytes, tensor types)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    qtype, file_type = _qtypes(quant)
    base, out = Path(base), Path(out)
    try:
        reader = GGUFReader(str(base))
    except (OSError, ValueError) as e:
        raise GGUFExportError(f"base GGUF {base}: cannot read it: {e}") from None
    arch = _field(reader, "general.architecture")
    if not arch:
        raise GGUFExportError(f"base GGUF {base}: no general.architecture field")
    processor_cls, permute = _permuter(arch)
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    config = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    state = dense_state(model)
    names = _name_map(model, processor_cls, config)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    plan = _plan(reader, state, names, qtype, base, tied)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch)
    bar = None
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == Keys.General.ARCHITECTURE:
                continue  # the writer adds these itself
            if key == Keys.General.FILE_TYPE:
                writer.add_key_value(key, int(file_type), GGUFValueType.UINT32)
                continue
            main = field.types[0]
            sub = field.types[-1] if main == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), main, sub_type=sub)
        if Keys.General.FILE_TYPE not in reader.fields:
            writer.add_key_value(Keys.General.FILE_TYPE, int(file_type), GGUFValueType.UINT32)
        for p in plan:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.nbytes for p in plan), unit="B", unit_scale=True, desc=f"GGUF {quant}",
                       file=sys.stderr, dynamic_ncols=True)
        for p in plan:
            data = _data(p, state, permute, (heads, kv_heads))
            writer.write_tensor_data(data)
            if bar is not None:
                bar.update(p.nbytes)
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    kinds: dict[str, int] = {}
    for p in plan:
        kinds[p.qtype.name] = kinds.get(p.qtype.name, 0) + 1
    return {"path": str(out), "bytes": out.stat().st_size, "base": str(base), "quant": quant,
            "tensors": kinds, "copied_from_base": [p.name for p in plan if p.source is None]}
