"""The noise stream a job uses: chosen by the spec, pinned by the seed-log header, adopted on resume.

The philox stream's jobs run on the CPU here through the Triton interpreter (TRITON_INTERPRET=1),
so these tests skip where triton is not installed (it is optional; CI does not install it).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from edgezo import seedlog
from edgezo.cli import main as cli_main
from edgezo.noise import make_noise
from edgezo.spec import SpecError, load_spec
from edgezo.testing.tiny import job_weights, rewrite_log, same_tensors
from edgezo.trainer import TrainingError, build_engine, prepare_job_dir, run_job

try:
    import importlib.util

    HAS_TRITON = importlib.util.find_spec("triton") is not None
except ValueError:  # pragma: no cover
    HAS_TRITON = False
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (optional)")
# philox runs on the GPU where there is one, else on the CPU through triton's interpreter (conftest)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


_weights, _same = job_weights, same_tensors





def test_noise_field_is_validated_and_auto_is_torch_on_cpu(tiny_spec_dict):
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, "noise": "fast"})
    assert e.value.field == "noise"
    assert make_noise("auto", torch.device("cpu")).name == "torch"
    spec = load_spec(tiny_spec_dict)
    assert spec["noise"] == "auto" and build_engine(spec).perturber.noise.name == "torch"


def test_philox_where_it_cannot_run_is_a_clear_error(tiny_spec_dict, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TrainingError, match="noise: the philox noise stream cannot run on cpu"):
        build_engine(load_spec({**tiny_spec_dict, "noise": "philox"}))


def test_a_log_written_with_philox_refuses_to_resume_where_philox_cannot_run(tmp_path, tiny_spec_dict, monkeypatch):
    spec = load_spec({**tiny_spec_dict, "eval_size": 0})
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    log = job / "seedlog.ezl"
    header, frames = seedlog.read(log)
    assert header["noise"] == "torch"
    header["noise"] = "philox"  # as if written on a GPU with Triton
    rewrite_log(log, header, frames)
    (job / "report.json").unlink()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(TrainingError, match="written with the philox noise stream"):
        run_job(job)


@needs_triton
def test_philox_job_trains_replays_and_resumes_bit_exact(tmp_path, tiny_spec_dict):
    spec = load_spec({**tiny_spec_dict, "noise": "philox", "steps": 6, "eval_size": 0, "snapshot_every": 4,
                      "precision": "fp16", "device": DEVICE})
    ref = prepare_job_dir(tmp_path / "ref", spec)
    run_job(ref)
    assert seedlog.read(ref / "seedlog.ezl")[0]["noise"] == "philox"
    trained = _weights(ref)
    torch_job = prepare_job_dir(tmp_path / "torch", {**spec, "noise": "torch"})
    run_job(torch_job)
    assert not _same(trained, _weights(torch_job)), "the two streams should give different directions"

    assert cli_main(["replay", str(ref), "--out", str(tmp_path / "replayed"), "--from-base"]) == 0
    replayed = {}
    for f in (tmp_path / "replayed").glob("*.safetensors"):
        replayed.update(load_file(str(f)))
    assert _same(trained, replayed)

    # resume after the last two step frames were lost, with a spec that now says torch: the log's
    # stream wins, and the result equals the uninterrupted run bit for bit
    job = prepare_job_dir(tmp_path / "job", spec)
    run_job(job)
    header, frames = seedlog.read(job / "seedlog.ezl")
    cut = next(i for i, f in enumerate(frames) if f.kind == seedlog.STEP and f.data["step"] >= 4)
    rewrite_log(job / "seedlog.ezl", header, frames[:cut])  # the log's tail is gone (the guard's last frames too)
    (job / "report.json").unlink()
    spec_path = job / "spec.json"
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), "noise": "torch"}))
    run_job(job)
    assert _same(trained, _weights(job))


@needs_triton
def test_a_device_triton_fails_on_is_reported_at_job_start_not_mid_step(monkeypatch):
    from edgezo import noise, triton_noise

    noise._philox_smoke.cache_clear()
    assert noise.philox_available(torch.device(DEVICE)) is None

    def broken(*a, **k):
        raise RuntimeError("PTX .version 8.4 does not support .target sm_53")

    monkeypatch.setattr(triton_noise, "add_noise_", broken)
    noise._philox_smoke.cache_clear()
    why = noise.philox_available(torch.device(DEVICE))
    assert why is not None and "sm_53" in why
    with pytest.raises(noise.NoiseUnavailable, match="sm_53"):
        make_noise("philox", torch.device(DEVICE))
    if DEVICE == "cuda":
        assert make_noise("auto", torch.device(DEVICE)).name == "torch"  # auto falls back
    noise._philox_smoke.cache_clear()
