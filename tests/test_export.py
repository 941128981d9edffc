"""`edgezo export` / `replay --format`: the trained model as GGUF, safetensors and peft, loaded back.

The GGUF round trip is judged by transformers' own GGUF loader (what `from_pretrained(gguf_file=)`
users get) against the trained model's logits. Tolerances:
- f16: every matrix entry is rounded to fp16 (relative error ≤ 2^-11 ≈ 4.9e-4 each), norms stay
  f32; the logits' relative L2 error stays within a few of those roundings: bound 2e-3.
- q8_0: each block of 32 weights is rounded to a step of absmax/127, an error of at most half a
  step: about 0.7 % relative RMS per Gaussian-like matrix (absmax ≈ 2.4·rms over 32 values:
  2.4 / (127·√12)). Through the tiny model's 15 quantised matrices the logits move ~1 % (measured
  1.1 %); bound 3 %, and the trained model must differ from the base by more than that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgezo.cli import main as cli_main
from edgezo.testing.tiny import make_gguf, make_model_dir, tiny_spec
from edgezo.trainer import prepare_job_dir, run_job

F16_BOUND, Q8_BOUND = 2e-3, 3e-2
PROMPTS = ["Review: a dull film , boring and bland .\nSentiment:", "Review: a lovely story , smart and funny ."]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-gguf")
    return make_gguf(make_model_dir(d / "hf"), d / "tiny-f32.gguf")


def _ids(tokenizer) -> torch.Tensor:
    enc = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = min(len(e) for e in enc)
    return torch.tensor([e[:width] for e in enc])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, **kw)


def _trained(job: Path):
    from edgezo.export import plain_model, trained_engine

    engine, _ = trained_engine(job)
    return plain_model(engine).eval(), engine.tokenizer


def _run(tmp_path: Path, model, name: str = "job", **overrides) -> Path:
    # the guard's held-out sentences off: these runs keep the trajectories their error bounds were set on
    # (lr 3e-2 blows some weights up, and how far f16 rounds them depends on the exact steps)
    spec = tiny_spec(model, tmp_path / "data", eval_size=0, eval_every=0, **{"guard": {"held_out": 0}, **overrides})
    from edgezo.spec import load_spec

    job = prepare_job_dir(tmp_path / name, load_spec(spec))
    run_job(job)
    return job


def _base_fields(path: Path) -> dict:
    from edgezo.to_gguf import gguf_metadata

    return {k: v for k, v in gguf_metadata(path).items() if k != "general.file_type"}


def _tensor_names(path: Path) -> list[str]:
    from gguf import GGUFReader

    return [t.name for t in GGUFReader(str(path)).tensors]


def test_base_fixture_is_what_transformers_loads(tiny_gguf):
    """The independent tiny GGUF writer agrees with transformers' loader (else the tests below prove nothing)."""
    from safetensors.torch import load_file

    gm, tok = _load_gguf(tiny_gguf)
    src = load_file(str(tiny_gguf.parent / "hf" / "model.safetensors"))
    got = gm.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.items())
    assert tok("Review: a dull film")["input_ids"] == _hf_tok(tiny_gguf)("Review: a dull film")["input_ids"]


def _hf_tok(tiny_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gguf.parent / "hf", local_files_only=True)


@pytest.mark.parametrize("quant,bound", [("f16", F16_BOUND), ("q8_0", Q8_BOUND)])
def test_gguf_round_trip_gives_the_trained_logits(tmp_path, tiny_gguf, quant, bound):
    # the job's model is the GGUF; lr 1e-3 trains without diverging (at 3e-2 the tiny model's loss went
    # 0.9 -> 770 in six steps on transformers 5.25, and weights of ~60 are beyond what q8_0 keeps to 3 %)
    job = _run(tmp_path, tiny_gguf, steps=6, optim={"lr": 1e-3, "eps": 1e-3})
    out = tmp_path / f"model-{quant}.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--quant", quant, "--out", str(out)]) == 0

    model, tok = _trained(job)
    ids = _ids(tok)
    ref = _logits(model, ids)
    exported, gtok = _load_gguf(out)
    assert _ids(gtok).tolist() == ids.tolist()  # the tokenizer came along
    assert rel_err(_logits(exported, ids), ref) < bound
    base, _ = _load_gguf(tiny_gguf)
    assert rel_err(_logits(base, ids), ref) > 3 * bound  # the comparison above can tell trained from base

    # a drop-in replacement: the base's metadata and tensor order, a file type that says what it holds
    from edgezo.to_gguf import gguf_metadata

    assert _base_fields(out) == _base_fields(tiny_gguf)
    assert gguf_metadata(out)["general.file_type"] == {"f16": 1, "q8_0": 7}[quant]
    assert _tensor_names(out) == _tensor_names(tiny_gguf)
    from gguf import GGUFReader

    kinds = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert kinds["output_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == quant.upper()


def test_replay_format_gguf_writes_the_same_file(tmp_path, tiny_gguf):
    job = _run(tmp_path, tiny_gguf, steps=4, optim={"lr": 3e-2, "eps": 1e-3}, snapshot_every=2)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--quant", "q8_0", "--out", str(a)]) == 0
    assert cli_main(["replay", str(job), "--format", "gguf", "--quant", "q8_0", "--out", str(b), "--from-base"]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_hf_directory_job_with_base_gguf(tmp_path, tiny_gguf, capsys):
    """A job on the HF directory takes its tokenizer/metadata from --base-gguf; without it, a clear refusal."""
    job = _run(tmp_path, tiny_gguf.parent / "hf", steps=3, optim={"lr": 3e-2, "eps": 1e-3})
    out = tmp_path / "m.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--base-gguf" in err and "not a GGUF" in err and not out.exists()

    assert cli_main(["export", str(job), "--format", "gguf", "--base-gguf", str(tiny_gguf), "--out", str(out)]) == 0
    model, tok = _trained(job)
    ids = _ids(tok)
    assert rel_err(_logits(_load_gguf(out)[0], ids), _logits(model, ids)) < F16_BOUND


def test_base_gguf_of_another_model_is_refused(tmp_path, tiny_gguf, capsys):
    other = make_gguf(make_model_dir(tmp_path / "other", hidden=32, heads=2), tmp_path / "other.gguf")
    job = _run(tmp_path, tiny_gguf.parent / "hf", steps=1)
    out = tmp_path / "m.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--base-gguf", str(other), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "token_embd.weight" in err and "shape" in err and "same architecture" in err
    assert not out.exists() and not list(tmp_path.glob(".m.gguf.tmp-*"))


def test_lora_job_merges_and_writes_every_format(tmp_path, tiny_gguf):
    job = _run(tmp_path, tiny_gguf, steps=6, trainable="lora", optim={"lr": 5e-2, "eps": 1e-3},
               lora={"rank": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj"]})
    from edgezo.export import trained_engine

    engine, _ = trained_engine(job)
    ids = _ids(engine.tokenizer)
    ref = _logits(engine.model, ids)  # the peft model: base + adapter, unmerged

    gg = tmp_path / "lora.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--out", str(gg)]) == 0
    assert rel_err(_logits(_load_gguf(gg)[0], ids), ref) < F16_BOUND
    assert rel_err(_logits(_load_gguf(tiny_gguf)[0], ids), ref) > 3 * F16_BOUND  # the adapter mattered

    from transformers import AutoModelForCausalLM

    full = tmp_path / "merged"
    assert cli_main(["export", str(job), "--format", "safetensors", "--out", str(full)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(full, local_files_only=True).eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert rel_err(_logits(merged, ids), ref) < 1e-5

    from peft import PeftModel

    adapter = tmp_path / "adapter"
    assert cli_main(["export", str(job), "--format", "peft", "--out", str(adapter)]) == 0
    base, _ = _load_gguf(tiny_gguf)
    assert rel_err(_logits(PeftModel.from_pretrained(base, adapter).eval(), ids), ref) < 1e-5


def test_fo_job_exports_its_finished_output(tmp_path, tiny_gguf):
    job = _run(tmp_path, tiny_gguf.parent / "hf", steps=3, method="fo", optim={"lr": 1e-2})
    gg = tmp_path / "fo.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--base-gguf", str(tiny_gguf), "--out", str(gg)]) == 0
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(job / "tiny", local_files_only=True).eval()
    ids = _ids(_hf_tok(tiny_gguf))
    ref = _logits(trained, ids)
    assert rel_err(_logits(_load_gguf(gg)[0], ids), ref) < F16_BOUND
    assert rel_err(_logits(_load_gguf(tiny_gguf)[0], ids), ref) > 3 * F16_BOUND


def test_int8_scales_job_is_dequantised_with_its_trained_scales(tmp_path, tiny_gguf):
    """trainable: scales trains LLM.int8 row scales; the GGUF holds codes × trained scales / 127. The int8
    model also rounds its activations to int8 (~0.4 % each matmul), so the bound here is 2 %, not f16's."""
    job = _run(tmp_path, tiny_gguf.parent / "hf", steps=4, precision="int8", trainable="scales",
               optim={"lr": 1e-2, "eps": 1e-3})
    gg = tmp_path / "scales.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--base-gguf", str(tiny_gguf), "--out", str(gg)]) == 0
    from edgezo.export import trained_engine

    engine, _ = trained_engine(job)
    ids = _ids(engine.tokenizer)
    ref = _logits(engine.model, ids)
    assert rel_err(_logits(_load_gguf(gg)[0], ids), ref) < 2e-2
    assert rel_err(_logits(_load_gguf(tiny_gguf)[0], ids), ref) > 6e-2


def test_cli_refuses_bad_requests_clearly(tmp_path, tiny_gguf, capsys):
    job = _run(tmp_path, tiny_gguf, steps=1)
    with pytest.raises(SystemExit) as e:
        cli_main(["export", str(job), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    cases = [
        (["--format", "peft"], "trainable: lora"),
        (["--format", "safetensors", "--quant", "q8_0"], "--quant applies to --format gguf only"),
        (["--format", "gguf", "--base-gguf", str(tmp_path / "nope.gguf")], "nope.gguf: no such file"),
    ]
    for flags, message in cases:
        assert cli_main(["export", str(job), *flags, "--out", str(tmp_path / "x")]) == 1
        assert message in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "data"), "--format", "gguf", "--out", str(tmp_path / "x")]) == 1
    assert "not a job directory" in capsys.readouterr().err
    assert cli_main(["export", "no-such-job", "--socket", str(tmp_path / "none.sock"), "--format", "gguf",
                     "--out", str(tmp_path / "x")]) == 1
    assert "neither a job directory nor a job id of a running daemon" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_daemon_job_id_exports_like_its_directory(tmp_path, tiny_gguf):
    from edgezo.testing.daemon import DaemonProc

    d = DaemonProc(None, engine=None).start()
    try:
        spec = tiny_spec(tiny_gguf, tmp_path / "data", steps=3, eval_size=0, eval_every=0)
        job_id = d.enqueue(spec)["id"]
        info = d.wait_state(job_id, ("done", "failed"), 180)
        assert info["state"] == "done", d.log()
        by_id, by_dir = tmp_path / "by-id.gguf", tmp_path / "by-dir.gguf"
        assert cli_main(["export", job_id, "--socket", str(d.socket), "--format", "gguf", "--out", str(by_id)]) == 0
        assert cli_main(["export", info["job_dir"], "--format", "gguf", "--out", str(by_dir)]) == 0
        assert by_id.read_bytes() == by_dir.read_bytes()
    finally:
        d.cleanup()


def test_a_crash_mid_write_leaves_no_file(tmp_path, tiny_gguf, monkeypatch):
    job = _run(tmp_path, tiny_gguf, steps=1)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous export")
    from edgezo import to_gguf

    real, calls = to_gguf._data, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(to_gguf, "_data", failing)
    with pytest.raises(OSError, match="disk full"):
        cli_main(["export", str(job), "--format", "gguf", "--out", str(out)])
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")] == []


def _packaged():
    from edgezo import assets

    try:
        return assets.default_assets()
    except assets.AssetError as e:
        pytest.skip(f"packaged assets not fetched: {e}")


@pytest.mark.integration
def test_packaged_model_exports_q8_0_gguf(tmp_path):
    """The default job, a few steps, as a q8_0 GGUF: the drop-in for the packaged GGUF, trained norm exact."""
    from gguf import GGUFReader

    from edgezo.spec import DEFAULT_SPEC, load_spec

    a = _packaged()
    spec = load_spec(DEFAULT_SPEC, ["steps=3", "batch_size=4", "eval_size=0", "optim.perturbations=8",
                                    "device=cpu", "guard.held_out=0"])  # 3 steps: export what they trained
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    out = tmp_path / "rt.gguf"
    assert cli_main(["export", str(job), "--format", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0

    assert _base_fields(out) == _base_fields(a.gguf) and _tensor_names(out) == _tensor_names(a.gguf)
    from safetensors.torch import load_file

    trained = load_file(str(job / "rt-sentiment" / "model.safetensors"))
    norm = next(t for t in GGUFReader(str(out)).tensors if t.name == "output_norm.weight")
    assert torch.equal(torch.from_numpy(norm.data.copy()), trained["model.norm.weight"])  # what was trained, exact
    assert not torch.equal(trained["model.norm.weight"], load_file(str(a.model_dir / "model.safetensors"))[
        "model.norm.weight"])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model = AutoModelForCausalLM.from_pretrained(job / "rt-sentiment", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(job / "rt-sentiment", local_files_only=True)
    ids = _ids(tok)
    ref = _logits(ref_model, ids)
    del ref_model
    got = _logits(_load_gguf(out)[0], ids)
    assert rel_err(got, ref) < Q8_BOUND
    assert torch.equal(got[:, -1].argmax(-1), ref[:, -1].argmax(-1))


def test_the_daemon_estimates_a_gguf_model_from_its_own_header(tiny_gguf):
    """A job on a .gguf model used to be estimated as the packaged 135M model; the GGUF's header
    gives the same architecture fields as the config.json it was made from."""
    import json

    from edgezo.model_files import model_config

    hf = json.loads((tiny_gguf.parent / "hf" / "config.json").read_text())
    got = model_config(str(tiny_gguf))
    assert got is not None
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings"):
        assert got[key] == hf[key], key
