"""The packaged real model (SmolLM2-135M on Rotten Tomatoes) for a few steps, end to end."""

from __future__ import annotations

import json

import pytest

from edgezo.spec import DEFAULT_SPEC, load_spec
from edgezo.trainer import prepare_job_dir, run_job


def _assets():
    from edgezo import assets

    try:
        return assets.default_assets()
    except assets.AssetError as e:
        pytest.skip(f"packaged assets not fetched: {e}")


@pytest.mark.integration
@pytest.mark.parametrize("method", ["fzoo", "mezo", "dizo"])
def test_default_job_runs_a_few_steps_on_the_real_model(tmp_path, method):
    _assets()
    recipe = [] if method == "fzoo" else [f"method={method}", "trainable=top1", "optim.perturbations=4",
                                          "optim.lr=1e-4"]  # the packaged recipe as is, or the others on top1
    spec = load_spec(DEFAULT_SPEC, [*recipe, "steps=3", "batch_size=4", "eval_size=16", "guard.held_out=32",
                                    "dizo.interval=2", "dizo.iters=1", "device=cpu"])
    job = prepare_job_dir(tmp_path / "job", spec)
    report = run_job(job)
    assert report["steps_done"] == 3
    zs, final = report["metrics"]["zero_shot"], report["metrics"]["final"]
    assert zs["n"] == final["n"] == 16 and zs["accuracy"] > 0.5  # the prompt works zero-shot
    held = report["guard"]["held_out"]  # checked at the start and the end, on train sentences
    assert held["n"] == 32 and held["checks"] == 2 and held["end"] >= held["start"]
    mem = report["memory"]
    assert mem["peak_bytes"] > 500 * 2**20  # 135M fp32 weights are resident
    assert {"load", "zo_step", "eval", "export"} <= set(mem["phases"])
    if method == "dizo":
        assert "projection" in mem["phases"]
        events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
        assert any(e["kind"] == "projection" for e in events)
    assert (job / "rt-sentiment" / "model.safetensors").is_file()
