"""The job spec: parse, apply `--set` overrides, fill defaults, validate.

Torch-free on purpose: `edgezo enqueue` and the daemon validate specs without loading the engine,
so a malformed spec is rejected at enqueue, naming the field, before any worker starts.
Every field's rule is here, in one place, which is what makes it long.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from edgezo.jobdir import JOB_FILES, SPEC
from edgezo.protocol import EdgezoError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
METHODS = ("mezo", "dizo", "fzoo", "kerzoo", "hizoo", "pseuzo", "fo")  # fo: the first-order baseline (AdamW, backprop)
TASK_TYPES = ("classification", "generation")
SCHEDULES = ("constant", "linear")
DEVICES = ("auto", "cpu", "cuda")
NOISE = ("auto", "torch", "philox")
DIRECTIONS = ("dense", "lowrank")  # edgezo/lowrank.py (kept here too: this module stays torch-free)
TRAINABLE_SETS = ("full", "lora", "scales")  # or topK (the last K blocks and the final norm), or name patterns
DEFAULT_SPEC = Path(__file__).with_name("default_spec.yaml")  # the packaged default job (`default`)
PATH_FIELDS = ("model", "task.train", "task.eval", "from_log")  # local paths ("default": the packaged assets)


def spec_paths(spec: dict) -> list[tuple[str, str]]:
    """(field, path) for every local path a spec names; "default" (the packaged assets) is left out."""
    out = []
    for field in PATH_FIELDS:
        value: Any = spec
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and value not in ("", "default"):
            out.append((field, value))
    return out


TOP_K = re.compile(r"top(0|[1-9][0-9]{0,3})")  # top0: the final norm alone

DEFAULTS: dict[str, Any] = {
    "name": None,
    "model": "default",
    "precision": "fp32",
    "trainable": "full",
    "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
    "method": "mezo",
    "optim": {"lr": 1.0e-5, "eps": 1.0e-3, "weight_decay": 0.0, "perturbations": 1, "schedule": "constant",
              "directions": "dense",  # dense | lowrank: z = U·Vᵀ/√r per Linear weight (edgezo/lowrank.py)
              "rank": 1},  # r of lowrank directions
    "dizo": {
        "interval": 50,
        "projection": "zo",
        "iters": 10,
        "eps": 0.1,
        "lr": 2.0,
        "clip": 0.2,
        "layers": ["q_proj", "v_proj"],
        "fo_lr": 0.01,
        "checkpointing": False,
    },
    "hizoo": {"smooth": 1.0e-6},  # α of HiZOO's curvature average (edgezo/hizoo.py)
    "pseuzo": {"window": 8, "beta": 0.9},  # PseuZO's sliding window (steps) and EMA factor (edgezo/pseuzo.py)
    # The guard (edgezo/guard.py): when the loss's moving average over `span` steps rises `rise`
    # (relative) above its best, roll back to that best step and multiply lr by lr_factor. It also
    # scores `held_out` train sentences kept out of training (at most a fifth of the split) at the
    # start, every `check_every` steps (0: only at the start and the end) and at the end: a check
    # worse than the best one by `z` paired standard errors rolls back there (lr lowered too); the job
    # ends on its last weights unless they are worse than the best check or below the start.
    "guard": {"rise": 0.25, "span": 40, "lr_factor": 0.5, "held_out": 256, "check_every": 100, "z": 1.96},
    "task": {
        "type": "classification",
        "train": "default",
        "eval": "default",
        "text_field": "text",
        "label_field": "label",
        "answer_field": "answer",
        "template": "Review: {text}\nSentiment:",
        "labels": {"rotten": " negative", "fresh": " positive"},
        "objective": "loss",
        "train_size": None,  # N: train on the first N rows of task.train only (epochs then repeat them)
    },
    "steps": 1000,
    "batch_size": 16,
    "max_length": 128,
    "eval_every": 200,
    "eval_size": 500,
    "seed": 0,
    "budget": None,
    "window": None,
    "output": None,
    "device": "auto",
    "noise": "auto",  # auto | torch | philox: the Gaussian stream (auto: philox on CUDA with Triton)
    # Snapshots (a full copy of the trainable tensors, + AdamW state for fo) bound how much a resume or
    # replay must redo. null: take one when redoing the steps since the last would take more than
    # snapshot.replay_s (measured update time; fo: measured step time); N > 0: every N steps; 0: never.
    "snapshot_every": None,
    "snapshot": {"keep": 1, "replay_s": 60.0},  # keep: the newest N survive (older ones are deleted)
    "fsync_every": 1,
    # A seed-log (a federation's merged log, edgezo/fleet) replayed onto the base model before step 0:
    # the job starts from those weights. Its sha256 is pinned in the job's own log header.
    "from_log": None,
}

KNOWN_TOP = set(DEFAULTS)


class SpecError(EdgezoError, ValueError):
    """A spec problem, tied to the dotted path of the field at fault."""

    kind, label = "spec", "bad spec"

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"spec field '{field}': {message}")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(value: Any, field: str = "budget") -> int:
    """Bytes from 6GiB, 512MiB, 6G, 6e9 or a plain integer."""
    if isinstance(value, bool):
        raise SpecError(field, f"expected a size like 6GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise SpecError(field, f"must be a positive size, got {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise SpecError(field, f"expected a size like 6GiB or 512MiB, got {value!r}")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    if not math.isfinite(number):
        raise SpecError(field, f"must be a positive size, got {value!r}")
    base = 1024 if "I" in unit else 1000
    prefix = unit[:1] if unit[:1] in "KMGT" else ""
    scale = base ** "_KMGT".index(prefix) if prefix else 1
    if number <= 0:
        raise SpecError(field, "must be positive")
    return int(number * scale)


def read_spec_file(path: str | Path) -> dict:
    """YAML or JSON (JSON is YAML), with a file-level error that names the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError("<file>", f"no such spec file: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError("<file>", f"{p} is not valid YAML/JSON: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError("<file>", f"{p} must hold a mapping of fields, got {type(data).__name__}")
    return data


def apply_sets(spec: dict, sets: list[str] | None) -> dict:
    """Apply `key.path=value` overrides; values are parsed as YAML scalars/lists."""
    out = copy.deepcopy(spec)
    for item in sets or []:
        if "=" not in item:
            raise SpecError(item, "an override must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise SpecError(item, "empty key in override")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


def _merge(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(defaults)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("labels",):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _num(spec: dict, path: str, *, kind: type = float, lo: float | None = None, lo_open: bool = False,
         hi: float | None = None) -> None:
    node, parts = spec, path.split(".")
    for p in parts[:-1]:
        node = node[p]
    v = node[parts[-1]]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if kind is float and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise SpecError(path, f"expected a number, got {v!r}") from None
        else:
            raise SpecError(path, f"expected {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not math.isfinite(v):  # NaN compares false, so it slipped through every range check
        raise SpecError(path, f"expected a finite number, got {v!r}")
    if kind is int:
        if float(v) != int(v):
            raise SpecError(path, f"expected an integer, got {v!r}")
        v = int(v)
    # a float field keeps an integer as written (16 stays 16): the validated spec validates to itself,
    # byte for byte, so its hash is the same wherever it is read again (worker, export, resume)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise SpecError(path, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise SpecError(path, f"must be <= {hi}, got {v}")
    node[parts[-1]] = v


def _choice(spec: dict, path: str, choices: tuple[str, ...]) -> None:
    node, parts = spec, path.split(".")
    for p in parts[:-1]:
        node = node[p]
    v = node[parts[-1]]
    if not isinstance(v, str) or v.lower() not in choices:
        raise SpecError(path, f"must be one of {', '.join(choices)}; got {v!r}")
    node[parts[-1]] = v.lower()


def _patterns(value: Any, field: str) -> list[str]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise SpecError(field, f"expected a non-empty list of module-name patterns, got {value!r}")
    return value


def _validate_lora(spec: dict) -> None:
    """LoRA adapters as the trainable set (peft); dropout must be 0: ZO's two forwards must see the same net."""
    _num(spec, "lora.rank", kind=int, lo=1)
    _num(spec, "lora.alpha", lo=0.0, lo_open=True)
    _num(spec, "lora.dropout", lo=0.0)
    if spec["lora"]["dropout"] != 0.0:
        raise SpecError("lora.dropout", "must be 0 for zeroth-order training (the +eps and -eps forwards must "
                        f"see the same network), got {spec['lora']['dropout']}")
    spec["lora"]["targets"] = _patterns(spec["lora"]["targets"], "lora.targets")


def _validate_fo(spec: dict, given: dict) -> None:
    """method: fo is AdamW through a backward: the trainable set and the objective must have gradients."""
    for field in ("rise", "held_out"):
        if (given.get("guard") or {}).get(field):
            raise SpecError(f"guard.{field}", "the guard rolls back by replaying logged ZO steps, and fo's "
                            "backprop steps cannot be replayed; leave guard out (it is off for fo)")
    spec["guard"]["rise"], spec["guard"]["held_out"] = 0.0, 0
    if spec["optim"]["directions"] != "dense":
        raise SpecError("optim.directions", "method: fo follows the gradient, not perturbation directions, so "
                        f"{spec['optim']['directions']} directions would change nothing it computes; leave "
                        "optim.directions out (or dense) with fo")
    if spec["trainable"] == "scales":
        raise SpecError("trainable", "method: fo differentiates the trainable set, and bitsandbytes' int8 matmul "
                        "has no gradient for its row scales; use trainable: lora with precision: int8")
    if spec["precision"] == "fp16" and spec["trainable"] != "lora":
        raise SpecError("precision", "method: fo keeps AdamW moments in the weights' dtype, and in fp16 its eps "
                        "(1e-8) underflows to 0; use fp32 or bf16, or trainable: lora (fp32 adapters)")
    if spec["task"]["objective"] != "loss":
        raise SpecError("task.objective", "method: fo descends the differentiable loss; "
                        f"{spec['task']['objective']} has no gradient (use objective: loss)")


def _validate_from_log(spec: dict, given: dict) -> None:
    """from_log: start from a replayed seed-log. Only methods whose records redo their update alone fit,
    and the guard is off: a rollback rebuilds from the base model, which would drop the log's steps."""
    if not isinstance(spec["from_log"], str) or not spec["from_log"].strip():
        raise SpecError("from_log", f"expected the path of a seed-log file, got {spec['from_log']!r}")
    if spec["method"] in ("fo", "dizo", "hizoo", "pseuzo"):
        raise SpecError("from_log", f"method: {spec['method']} cannot start from a log: its steps are not redone "
                        "from step records alone, or it carries state (H, a window) a log's start would not "
                        "hand over (use mezo, fzoo or kerzoo)")
    if spec["trainable"] == "lora":
        raise SpecError("from_log", "trainable: lora draws its adapters from the job's seed, so another job's log "
                        "would be replayed onto different adapters; use full, topK or module names")
    for field in ("rise", "held_out"):
        if (given.get("guard") or {}).get(field):
            raise SpecError(f"guard.{field}", "the guard rolls back by rebuilding from the base model, which "
                            "would drop the steps of from_log; leave guard out (it is off with from_log)")
    spec["guard"]["rise"], spec["guard"]["held_out"] = 0.0, 0


def _validate_hizoo_pseuzo(spec: dict) -> None:
    """HiZOO preconditions each element of z; PseuZO differentiates the loss in the label logits."""
    _num(spec, "hizoo.smooth", lo=0.0, hi=1.0)
    _num(spec, "pseuzo.window", kind=int, lo=1, hi=256)
    _num(spec, "pseuzo.beta", lo=0.0, hi=1.0)
    if spec["method"] == "hizoo" and spec["optim"]["directions"] != "dense":
        raise SpecError("optim.directions", "hizoo scales every element of z by its H^(-1/2), and H^(-1/2)·U·Vᵀ "
                        "is no longer low rank (it could not be applied inside the forward); use dense")
    if spec["method"] == "pseuzo":
        if spec["task"]["type"] != "classification":
            raise SpecError("task.type", "pseuzo keeps the model outputs its loss reads, which for generation are "
                            "[batch, length, vocabulary] logits a step; it needs task.type: classification")
        if spec["task"]["objective"] != "loss":
            raise SpecError("task.objective", "pseuzo takes the exact gradient of the loss in the logits; "
                            f"{spec['task']['objective']} has none (use objective: loss)")


def validate(given: dict) -> dict:
    """Return the full spec (defaults filled in) or raise SpecError naming the first bad field."""
    if not isinstance(given, dict):
        raise SpecError("<spec>", "a spec is a mapping of fields")
    unknown = sorted(set(given) - KNOWN_TOP)
    if unknown:
        raise SpecError(unknown[0], f"unknown field (known: {', '.join(sorted(KNOWN_TOP))})")
    for section in ("optim", "dizo", "task", "lora", "guard", "snapshot", "hizoo", "pseuzo"):
        if section in given and not isinstance(given[section], dict):
            raise SpecError(section, f"expected a mapping, got {given[section]!r}")
        extra = sorted(set(given.get(section) or {}) - set(DEFAULTS[section]))
        if extra:
            raise SpecError(f"{section}.{extra[0]}", f"unknown field (known: {', '.join(sorted(DEFAULTS[section]))})")
    spec = _merge(DEFAULTS, given)

    if not isinstance(spec["model"], str) or not spec["model"].strip():
        raise SpecError("model", "expected 'default', a local HF directory or a .gguf file")
    _choice(spec, "precision", PRECISIONS)
    _choice(spec, "method", METHODS)
    _choice(spec, "device", DEVICES)
    _choice(spec, "noise", NOISE)
    trainable = spec["trainable"]
    if isinstance(trainable, str) and re.fullmatch(r"top[0-9]+", trainable.lower()) and not TOP_K.fullmatch(
            trainable.lower()):
        raise SpecError("trainable", f"topK trains the last K blocks and the final norm (top0: the final norm "
                        f"alone); K is a whole number without leading zeros, got {trainable!r}")
    if isinstance(trainable, str) and (trainable.lower() in TRAINABLE_SETS or TOP_K.fullmatch(trainable.lower())):
        spec["trainable"] = trainable.lower()
    else:
        spec["trainable"] = _patterns(trainable, "trainable")
    if spec["precision"] == "int8" and spec["trainable"] not in ("lora", "scales"):
        raise SpecError("trainable", "int8 weights cannot be perturbed in place (their codes step in units of "
                        "absmax/127); use trainable: lora or trainable: scales with precision: int8")
    if spec["trainable"] == "scales" and spec["precision"] != "int8":
        raise SpecError("trainable", "scales are the per-row scales of int8 layers; they need precision: int8, "
                        f"got precision: {spec['precision']}")
    if spec["precision"] == "int8" and spec["model"].strip().lower().endswith(".gguf"):
        raise SpecError("precision", "int8 loads a Hugging Face safetensors directory with bitsandbytes, not a "
                        ".gguf file; use fp32, fp16 or bf16 for GGUF models")
    if spec["trainable"] == "lora" or "lora" in given:  # fields the user wrote are checked even if unused
        _validate_lora(spec)

    _num(spec, "optim.lr", lo=0.0)
    _num(spec, "optim.eps", lo=0.0, lo_open=True)
    _num(spec, "optim.weight_decay", lo=0.0)
    _num(spec, "optim.perturbations", kind=int, lo=1)
    _choice(spec, "optim.schedule", SCHEDULES)
    _choice(spec, "optim.directions", DIRECTIONS)
    _num(spec, "optim.rank", kind=int, lo=1)
    if spec["method"] == "fzoo" and spec["optim"]["perturbations"] < 2:
        raise SpecError("optim.perturbations", "fzoo scales its step by the spread of the perturbed losses, so it "
                        f"needs at least 2 directions per step (8-16 is typical), got {spec['optim']['perturbations']}")

    _num(spec, "guard.rise", lo=0.0)  # 0: off
    _num(spec, "guard.held_out", kind=int, lo=0)  # 0: off
    _num(spec, "guard.check_every", kind=int, lo=0)
    _num(spec, "guard.z", lo=0.0)
    _num(spec, "guard.span", kind=int, lo=1)
    _num(spec, "guard.lr_factor", lo=0.0, lo_open=True)
    if spec["guard"]["lr_factor"] > 1.0:
        raise SpecError("guard.lr_factor", f"lr is multiplied by it after a rollback; must be in (0, 1], "
                        f"got {spec['guard']['lr_factor']}")

    d = spec["dizo"]
    _num(spec, "dizo.interval", kind=int, lo=1)
    _num(spec, "dizo.iters", kind=int, lo=1)
    _num(spec, "dizo.eps", lo=0.0, lo_open=True)
    _num(spec, "dizo.lr", lo=0.0)
    _num(spec, "dizo.clip", lo=0.0)
    _num(spec, "dizo.fo_lr", lo=0.0)
    if d["clip"] >= 1.0:
        raise SpecError("dizo.clip", f"must be below 1 (the projection ratio stays in [1-clip, 1+clip]), got {d['clip']}")
    _choice(spec, "dizo.projection", ("zo", "fo"))
    d["layers"] = _patterns(d["layers"], "dizo.layers")
    if spec["method"] == "dizo" and d["projection"] == "fo" and spec["trainable"] == "scales":
        raise SpecError("dizo.projection", "fo differentiates through the projected weights, and bitsandbytes' "
                        "int8 matmul has no gradient for its row scales; use dizo.projection: zo with "
                        "trainable: scales")

    t = spec["task"]
    _choice(spec, "task.type", TASK_TYPES)
    for f in ("train", "eval", "text_field", "template"):
        if not isinstance(t[f], str) or not t[f]:
            raise SpecError(f"task.{f}", f"expected a non-empty string, got {t[f]!r}")
    if "{" not in t["template"]:
        raise SpecError("task.template", "the template must use at least one {field} of the data")
    if t["type"] == "classification":
        labels = t["labels"]
        if not isinstance(labels, dict) or len(labels) < 2:
            raise SpecError("task.labels", "expected a mapping of at least two label values to verbalizer words")
        for k, v in labels.items():
            if not isinstance(v, str) or not v:
                raise SpecError(f"task.labels.{k}", f"verbalizer must be a non-empty string, got {v!r}")
        t["labels"] = {str(k): v for k, v in labels.items()}
        if not isinstance(t["label_field"], str) or not t["label_field"]:
            raise SpecError("task.label_field", "expected the name of the label column")
    else:
        if not isinstance(t["answer_field"], str) or not t["answer_field"]:
            raise SpecError("task.answer_field", "expected the name of the answer column")
    _choice(spec, "task.objective", ("loss", "f1", "accuracy"))
    if t["train_size"] is not None:
        _num(spec, "task.train_size", kind=int, lo=1)
    if spec["method"] == "fo":
        _validate_fo(spec, given)
    if spec["from_log"] is not None:
        _validate_from_log(spec, given)
    _validate_hizoo_pseuzo(spec)

    _num(spec, "steps", kind=int, lo=0, hi=10**9)  # 0: evaluate only
    _num(spec, "batch_size", kind=int, lo=1)
    _num(spec, "max_length", kind=int, lo=8)
    _num(spec, "eval_every", kind=int, lo=0)
    _num(spec, "eval_size", kind=int, lo=0)
    _num(spec, "seed", kind=int, lo=0, hi=2**63 - 1)  # torch seeds are 64-bit
    if spec["snapshot_every"] is not None:  # null: by replay cost (snapshot.replay_s)
        _num(spec, "snapshot_every", kind=int, lo=0)
    _num(spec, "snapshot.keep", kind=int, lo=1)
    _num(spec, "snapshot.replay_s", lo=0.0, lo_open=True)
    _num(spec, "fsync_every", kind=int, lo=0)
    if spec["budget"] is not None:
        spec["budget"] = parse_size(spec["budget"], "budget")
    if spec["window"] is not None and (not isinstance(spec["window"], str) or len(spec["window"].split()) != 5):
        raise SpecError("window", f"expected a 5-field cron expression like '0 1-5 * * *', got {spec['window']!r}")

    name = spec["name"] or "job"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise SpecError("name", f"use letters, digits, '.', '_' or '-' (max 64), got {name!r}")
    spec["name"] = name
    out = spec["output"] or name
    if not isinstance(out, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", out):
        raise SpecError("output", f"a plain name that stays inside the job directory, got {out!r}")
    if out in JOB_FILES or out.endswith(".tmp"):
        raise SpecError("output", f"{out!r} is the name of one of the job's own files ({', '.join(sorted(JOB_FILES))}); "
                        "choose another output (or name)")
    spec["output"] = out
    return spec


def load_spec(source: str | Path | dict, sets: list[str] | None = None) -> dict:
    """Read (file or mapping), apply overrides, validate. The one entry point for every caller."""
    raw = read_spec_file(source) if not isinstance(source, dict) else copy.deepcopy(source)
    return validate(apply_sets(raw, sets))


def read_job_spec(job_dir: str | Path) -> dict:
    """A job directory's spec.json, validated again: whoever reads a job (worker, export, resume)
    trusts only a spec that passes the same checks the CLI and the daemon applied when it was written."""
    path = Path(job_dir) / SPEC
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise SpecError("<file>", f"{path}: cannot read the job's spec ({e.strerror or e})") from None
    except ValueError as e:
        raise SpecError("<file>", f"{path}: not valid JSON ({e})") from None
    guard = raw.get("guard") if isinstance(raw, dict) else None
    if isinstance(guard, dict) and "held_out" not in guard:  # written before the held-out watch existed:
        guard["held_out"] = 0  # the job ran without it, and its seed-log resumes as it was
    return validate(raw)


def spec_hash(spec: dict) -> str:
    """Stable hash of the fields that change what training computes (not name/window/budget).

    `noise` is left out: "auto" resolves per machine, and the seed-log header pins the stream used;
    `snapshot` (how many to keep, when replay costs too much) too: it never changes the weights.
    `optim.directions`/`optim.rank` count only for lowrank directions (rank means nothing to dense
    ones), so a dense spec hashes as it did before those fields existed and older logs still resume;
    `task.train_size` counts only when set, for the same reason."""
    keep = {k: v for k, v in spec.items()
            if k not in ("name", "window", "budget", "output", "fsync_every", "noise", "snapshot")}
    for section in ("hizoo", "pseuzo"):  # a method's own section counts for that method only
        if keep.get("method") != section:
            keep.pop(section, None)
    optim = keep.get("optim")
    if isinstance(optim, dict) and optim.get("directions", "dense") == "dense":
        keep["optim"] = {k: v for k, v in optim.items() if k not in ("directions", "rank")}
    task = keep.get("task")
    if isinstance(task, dict) and task.get("train_size") is None:  # as before the field existed
        keep["task"] = {k: v for k, v in task.items() if k != "train_size"}
    guard = keep.get("guard")
    if isinstance(guard, dict) and not guard.get("held_out"):  # off: as before the held-out watch existed
        keep["guard"] = {k: v for k, v in guard.items() if k not in ("held_out", "check_every", "z")}
    if keep.get("from_log") is None:  # as before the field existed
        keep.pop("from_log", None)
    blob = json.dumps(keep, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
