"""A job's trained model in the form its users serve it: GGUF, a full safetensors directory, or a peft adapter.

`edgezo export` and `edgezo replay --format` share this. The trained weights are rebuilt the way
replay rebuilds them (base model + newest snapshot + the seed-log steps after it); a `method: fo`
job, whose steps cannot be redone from scalars, gives its finished output, or else its newest
snapshot. LoRA jobs are merged into the base for GGUF and safetensors.
Directories are written into a temporary sibling and moved in file by file, so a crash never
leaves a half-written file in the destination (files of other names already there are kept).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgezo.protocol import EdgezoError
from edgezo.spec import read_job_spec

FORMATS = ("gguf", "safetensors", "peft")
QUANTS = ("f16", "q8_0")  # GGUF matrix types; norms stay F32


class ExportError(EdgezoError, RuntimeError):
    """The job cannot be exported as asked; the message names the option or file to change."""

    kind, label = "export", "export refused"


def read_spec(job_dir: Path) -> dict:
    path = Path(job_dir) / "spec.json"
    if not path.is_file():
        raise ExportError(f"{job_dir} is not a job directory (no spec.json)")
    return read_job_spec(job_dir)


def check_request(spec: dict, fmt: str, quant: str | None, base_gguf: str | None) -> None:
    """Refuse impossible combinations before loading anything (the model takes a while)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if quant is not None and fmt != "gguf":
        raise ExportError(f"--quant applies to --format gguf only (got --format {fmt})")
    if base_gguf is not None and fmt != "gguf":
        raise ExportError(f"--base-gguf applies to --format gguf only (got --format {fmt})")
    if fmt == "peft" and spec.get("trainable") != "lora":
        raise ExportError(f"--format peft writes a LoRA adapter, but this job trains {spec.get('trainable')!r} "
                          "(trainable: lora is needed); use --format safetensors or gguf")
    if fmt == "gguf":
        if quant is not None and quant not in QUANTS:
            raise ExportError(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
        base_gguf_for(spec, base_gguf)


def base_gguf_for(spec: dict, explicit: str | None) -> Path:
    """The GGUF whose metadata and tokenizer the export reuses: --base-gguf, the job's model when it is
    a .gguf file, or the packaged model's source GGUF for `model: default`."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ExportError(f"--base-gguf {explicit}: no such file")
        return path
    model = str(spec.get("model"))
    if model == "default":
        from edgezo import assets

        return assets.default_assets().gguf
    if model.lower().endswith(".gguf") and Path(model).expanduser().is_file():
        return Path(model).expanduser()
    raise ExportError(
        f"--format gguf takes the tokenizer and metadata from a GGUF of the base model, and this job's model "
        f"({model}) is not a GGUF file: pass --base-gguf FILE, a GGUF of that same model (any quantisation), "
        "or export --format safetensors")


def trained_engine(job_dir: Path, *, from_base: bool = False):
    """(engine with the job's trained weights, steps they hold)."""
    from edgezo.trainer import build_engine, restore

    spec = read_spec(job_dir)
    engine = build_engine(spec)
    if spec.get("method") == "fo":
        return engine, _load_fo(engine, Path(job_dir), from_base)
    return engine, restore(engine, Path(job_dir) / "seedlog.ezl", use_snapshots=not from_base)


def _load_fo(engine, job_dir: Path, from_base: bool) -> int:
    """method: fo: the finished output (report.json says done), else the newest snapshot; the seed-log is
    only read (resume, not export, cuts it back to a snapshot)."""
    from edgezo import seedlog
    from edgezo.trainer import TrainingError, load_trainable, not_replayable_message

    if from_base:
        raise TrainingError(not_replayable_message(job_dir))
    spec = engine.spec
    report = job_dir / "report.json"
    out = job_dir / spec["output"]
    if report.is_file() and out.is_dir():
        _load_output(engine, out)
        return int(json.loads(report.read_text()).get("steps_done", spec["steps"]))
    _, frames = seedlog.read(job_dir / "seedlog.ezl")
    for f in reversed(frames):
        if f.kind == seedlog.SNAPSHOT and (job_dir / f.data["file"]).is_file():
            load_trainable(engine, job_dir / f.data["file"])
            print(f"note: {job_dir} has not finished; exporting its newest snapshot (after step {f.data['step']})",
                  file=sys.stderr)
            return f.data["step"] + 1
    raise ExportError(f"{job_dir} (method: fo) has neither a finished output ({out}) nor a snapshot yet; "
                      "`edgezo resume` it, or wait for its first snapshot")


def _load_output(engine, out: Path) -> None:
    import torch
    from safetensors.torch import load_file

    if engine.spec["trainable"] == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(engine.model, load_file(str(out / "adapter_model.safetensors")))
        return
    if engine.spec["trainable"] == "scales":
        raise ExportError("a method: fo job over trainable: scales cannot be exported from its output")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    with torch.no_grad():
        for p in engine.params:
            if p.name not in state:
                raise ExportError(f"{out} has no tensor {p.name}; it is not this job's finished output")
            p.param.copy_(state[p.name])


def plain_model(engine):
    """The transformers model with any LoRA adapter merged into its weights."""
    from edgezo.lora import is_lora

    if is_lora(engine.model):
        return engine.model.merge_and_unload()
    return engine.model


def export_job(job_dir: Path, fmt: str, out: Path, *, quant: str | None = None, base_gguf: str | None = None,
               from_base: bool = False, progress: bool = False) -> dict[str, Any]:
    """Rebuild the job's trained weights and write them as `fmt` at `out`; returns what was written."""
    job_dir, out = Path(job_dir), Path(out)
    spec = read_spec(job_dir)
    check_request(spec, fmt, quant, base_gguf)
    engine, steps = trained_engine(job_dir, from_base=from_base)
    if fmt == "gguf":
        from edgezo.to_gguf import GGUFExportError, write_gguf

        base = base_gguf_for(spec, base_gguf)
        if out.is_dir():
            out = out / f"{spec['name']}-{quant or 'f16'}.gguf"
        try:
            info = write_gguf(plain_model(engine), base, out, quant or "f16", progress=progress)
        except GGUFExportError as e:
            raise ExportError(str(e)) from None
        return {**info, "format": "gguf", "steps": steps}
    if fmt == "peft":
        from edgezo.lora import save_adapter

        _write_dir(out, lambda d: (save_adapter(engine.model, d), engine.tokenizer.save_pretrained(d)))
    elif spec["trainable"] == "scales":  # an LLM.int8 checkpoint with the trained scales (safetensors)
        from edgezo.scales import save_int8

        _write_dir(out, lambda d: (save_int8(engine.model, d), engine.tokenizer.save_pretrained(d)))
    else:
        model = plain_model(engine)
        _write_dir(out, lambda d: (model.save_pretrained(d), engine.tokenizer.save_pretrained(d)))
    return {"path": str(out), "format": fmt, "steps": steps,
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}


def _write_dir(out: Path, write) -> None:
    """Write into a temp sibling, fsync, then move each file into `out` (atomic per file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory for this format")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            f.chmod(0o644)
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
