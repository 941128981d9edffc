"""A job's disk: expected from its model's files before it starts, measured in its directory, and a
daemon that does not start a job the disk cannot hold (issue 14, item 2)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from daemon.core import Config, Daemon
from daemon.diskroom import NoDiskRoom
from daemon.store import Job
from edgezo.disk import job_disk_use
from edgezo.model_files import model_files, safetensors_shapes
from edgezo.spec import load_spec
from policies import disk as dp

MiB = 2**20
SHAPES = [("model.embed_tokens.weight", (100, 8)),
          *[(f"model.layers.{i}.{m}.weight", (8, 8)) for i in range(3) for m in ("q_proj", "v_proj")],
          *[(f"model.layers.{i}.norm.weight", (8,)) for i in range(3)],
          ("model.norm.weight", (8,))]


def test_expected_bytes_follow_the_trainable_set_and_method():
    whole = 800 + 3 * (128 + 8) + 8
    need = dp.need(SHAPES, trainable="full", precision="fp32", method="mezo", steps=10, side_files=100)
    assert need.output == whole * 4 + 100 and need.snapshot == whole * 4
    assert need.snapshots == 2  # keep 1, + the one being written
    assert need.total == need.output + 2 * need.snapshot + need.journal
    assert dp.need(SHAPES, trainable="full", precision="bf16", method="mezo", steps=10).snapshot == whole * 2
    assert dp.trainable_bytes(SHAPES, "top0", "fp32") == 8 * 4  # the final norm alone
    assert dp.trainable_bytes(SHAPES, "top1", "fp32") == (8 + 128 + 8) * 4  # + the last block
    assert dp.trainable_bytes(SHAPES, ["q_proj"], "fp32") == 3 * 64 * 4
    lora = {"rank": 2, "targets": ["q_proj"]}
    assert dp.trainable_bytes(SHAPES, "lora", "int8", lora) == 3 * 2 * (8 + 8) * 4  # fp32 adapters
    assert dp.need(SHAPES, trainable="lora", precision="int8", method="mezo", steps=1, lora=lora).output == 384
    assert dp.trainable_bytes(SHAPES, "scales", "int8") == 6 * 8 * 4  # one fp32 scale per row
    fo = dp.need(SHAPES, trainable="top0", precision="fp32", method="fo", steps=10)
    assert fo.snapshot == 3 * 8 * 4  # + AdamW's two moments
    never = dp.need(SHAPES, trainable="full", precision="fp32", method="mezo", steps=10, snapshot_every=0)
    assert never.snapshots == 0 and never.total == never.output + never.journal
    assert dp.need(SHAPES, trainable="full", precision="fp32", method="fzoo", steps=10, perturbations=128,
                   keep=3).snapshots == 4
    assert dp.need(SHAPES, trainable="full", precision="fp32", method="fzoo", steps=10,
                   perturbations=128).journal > 10 * 128 * 8  # each direction's seed and scalar


def test_the_fit_decision_names_the_numbers():
    assert dp.disk_wait(100 * MiB, 200 * MiB, "/state", "x") is None
    why = dp.disk_wait(300 * MiB, 200 * MiB, "/state/jobs", "output 300.0 MiB", promised=50 * MiB)
    assert why == ("needs 300.0 MiB of disk (output 300.0 MiB), 150.0 MiB free on /state/jobs (200.0 MiB free, "
                   "50.0 MiB of it still to be written by running jobs)")


def test_config_shapes_count_what_the_memory_estimate_counts():
    from policies.memory import SMOLLM2_135M, count_params

    assert sum(dp.numel(s) for _, s in dp.llama_shapes(SMOLLM2_135M)) == count_params(SMOLLM2_135M)


def test_the_estimate_matches_what_a_real_job_writes(tmp_path, tiny_spec_dict):
    """Read from the model's safetensors header, the expected output and snapshot are what a full-
    trainable run of the tiny model actually leaves (headers and tokenizer aside)."""
    from edgezo.trainer import prepare_job_dir, run_job

    spec = load_spec({**tiny_spec_dict, "steps": 4, "eval_size": 0, "snapshot_every": 2})
    job = prepare_job_dir(tmp_path / "job", spec)
    report = run_job(job)
    shapes, side = model_files(spec["model"])
    need = dp.need(shapes, trainable="full", precision="fp32", method="mezo", steps=4, side_files=side)
    disk = report["disk"]
    assert disk["snapshots"] == 1 and need.snapshot <= disk["snapshot_bytes"] <= need.snapshot + 16 * 1024
    assert abs(disk["output_bytes"] - need.output) <= 0.05 * need.output
    assert 0 < disk["seedlog_bytes"] <= need.journal
    now = job_disk_use(job, spec["output"])  # report.json and the last event came after
    assert now["output_bytes"] == disk["output_bytes"] and now["other_bytes"] > disk["other_bytes"]


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"[1,2]")
    with pytest.raises(ValueError, match="model.safetensors"):
        safetensors_shapes(bad)


def _huge_model(root: Path) -> Path:
    """A model whose config is tiny (its memory estimate fits) but whose safetensors header declares
    4 × 10^13 bytes of weights: only the header is on disk, which is all the daemon reads."""
    d = root / "huge"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
                                               "num_hidden_layers": 2, "num_attention_heads": 4}))
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [10**6, 10**7],
                                                       "data_offsets": [0, 4 * 10**13]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return d


@pytest.fixture
def core(tmp_path):
    d = Daemon(Config(state_dir=tmp_path / "state", socket_path=tmp_path / "s.sock", budget=1000 * MiB, reserve=0))
    d.open()
    yield d
    d.store.close()


def test_a_job_the_disk_cannot_hold_is_refused_at_enqueue_with_the_numbers(core, tmp_path):
    model = _huge_model(tmp_path)
    with pytest.raises(NoDiskRoom) as e:
        core.enqueue({"name": "huge", "model": str(model), "batch_size": 1, "max_length": 32})
    free = shutil.disk_usage(core.jobs_dir).free
    msg = str(e.value)
    assert e.value.need > free and "of disk" in msg and str(core.jobs_dir) in msg
    assert "output 36.4 TiB" in msg and "2 snapshots of 36.4 TiB" in msg and "snapshot_every: 0" in msg
    assert not core.jobs and not list(core.jobs_dir.iterdir())


def test_a_queued_job_waits_for_disk_with_the_reason_and_others_start(core, tmp_path):
    """Disk taken after enqueue: the job stays queued, `edgezo status` says why, smaller jobs go on."""
    from daemon.monitor import DeviceState

    core.device = DeviceState(ts=0.0, source="system", name="test", total=10**12, used=0, free=10**12,
                              edgezo=0, jobs={})
    spec = load_spec({"name": "huge", "model": str(_huge_model(tmp_path)), "batch_size": 1, "max_length": 32})
    big = Job(id="huge-1", seq=1, name="huge", spec=spec, job_dir=str(core.jobs_dir / "huge-1"), created=0.0,
              queued_at=0.0, estimate=100 * MiB)
    core.jobs[big.id] = big
    small = core.enqueue({"name": "small", "batch_size": 1, "max_length": 32, "trainable": "lora"})
    started: list[str] = []
    core.start = lambda job, now: started.append(job.id)
    core.scheduler.admit(1.0)
    assert started == [small.id]
    assert big.state == "queued" and big.reason.startswith("waiting: needs ") and "free on" in big.reason
    assert any(e["kind"] == "disk-wait" for e in core.store.events(big.id, 0))


def test_what_a_paused_job_already_wrote_counts_against_its_need(core):
    job = core.enqueue({"name": "rt", "batch_size": 1, "max_length": 32})
    need = core.disk.job_need(job).total
    written = sum(f.stat().st_size for f in Path(job.job_dir).iterdir())  # spec.json and job.json
    assert written > 0 and core.disk.left(job) == need - written
    (Path(job.job_dir) / "seedlog.ezl").write_bytes(b"\0" * MiB)
    assert core.disk.left(job) == need - written - MiB


def test_a_daemon_jobs_report_shows_its_directory_on_disk(core):
    from daemon.api import job_report
    from edgezo.daemon_cli import render_report

    job = core.enqueue({"name": "rt", "batch_size": 1, "max_length": 32})
    (Path(job.job_dir) / "snapshots").mkdir()
    (Path(job.job_dir) / "snapshots" / "step-00000009.safetensors").write_bytes(b"\0" * 4096)
    report = job_report(core, job)
    assert report["disk"]["snapshots"] == 1 and report["disk"]["snapshot_bytes"] == 4096
    assert "1 snapshot 4.00 KiB" in render_report(report)
