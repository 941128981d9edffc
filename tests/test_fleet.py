"""The fleet (issue 16): federated ZO rounds on Flower, exchanging seed-log records.

The end-to-end test runs a real SuperLink, real SuperNodes and one real edgezo daemon per device on
loopback, with the tiny model; the unit tests pin the server's record checks and the merge.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from edgezo import seedlog
from edgezo.fleet import records as R
from edgezo.spec import SpecError, load_spec

SPEC = {"optim": {"lr": 1e-3, "weight_decay": 0.0, "schedule": "constant", "perturbations": 1}}


def good_round(job_seed: int = 7, steps: int = 3) -> tuple[list[dict], list[list[int]]]:
    seeds = R.round_seeds(job_seed, steps, 1)
    recs = [{"step": i, "seeds": seeds[i], "grads": [0.5 - i], "lr": 1e-3, "wd": 0.0, "loss": 0.7} for i in range(steps)]
    return recs, seeds


def test_records_travel_framed_and_checksummed():
    recs, _ = good_round()
    blob = R.encode(recs)
    assert R.decode(blob) == recs
    flipped = bytearray(blob)
    flipped[12] ^= 0x01
    with pytest.raises(R.RecordError, match="checksum"):
        R.decode(bytes(flipped))
    with pytest.raises(R.RecordError, match="runs past the end"):
        R.decode(blob[:-3])


@pytest.mark.parametrize("field,value,message", [
    ("grads", [float("nan")], "record 1: projected gradient nan is not a finite number"),
    ("seeds", [12345], "record 1: seed 12345 is not one of the seeds this device was given"),
    ("lr", 1.0, "record 1: lr 1.0, the federation's spec gives 0.001"),
    ("seeds", [], "record 1: an empty step"),
    ("step", 5, "record 1: step 5, expected 1"),
])
def test_the_server_rejects_a_round_with_one_bad_record(field, value, message):
    recs, seeds = good_round()
    assert len(R.check_round(recs, seeds=seeds, spec=SPEC)) == 3
    recs[1][field] = value
    with pytest.raises(R.RecordError, match=message.replace("(", r"\(")):
        R.check_round(recs, seeds=seeds, spec=SPEC)


def test_a_device_on_another_base_model_is_rejected():
    mine = {"base_model_hash": "aa", "dtype": "fp32", "noise": "torch", "directions": "dense", "rank": None,
            "params": [["w", [2]]]}
    R.check_header(mine, dict(mine))
    with pytest.raises(R.RecordError, match="wrong base-model hash"):
        R.check_header(mine, {**mine, "base_model_hash": "bb"})


def test_merge_order_is_by_device_name_and_lr_is_the_mean():
    a, _ = good_round(1, 2)
    b, _ = good_round(2, 2)
    one = R.merge({"dev-b": b, "dev-a": a}, 10, 3)
    two = R.merge({"dev-a": a, "dev-b": b}, 10, 3)
    assert one == two  # arrival order does not matter
    assert [(m["step"], m["d"], m["k"]) for m in one] == [(10, "dev-a", 0), (11, "dev-a", 1), (12, "dev-b", 0),
                                                          (13, "dev-b", 1)]
    assert all(m["lr"] == 1e-3 / 2 for m in one)
    assert R.round_seed(0, 2, "dev-a") < R.SEED_LIMIT and R.round_seed(0, 2, "dev-a") != R.round_seed(0, 2, "dev-b")


def test_from_log_refuses_methods_and_sets_it_cannot_replay(tiny_spec_dict):
    for extra, field in (({"method": "dizo"}, "from_log"), ({"trainable": "lora"}, "from_log"),
                         ({"guard": {"rise": 0.3}}, "guard.rise")):
        with pytest.raises(SpecError) as e:
            load_spec({**tiny_spec_dict, "from_log": "/x.ezl", **extra})
        assert e.value.field == field
    spec = load_spec({**tiny_spec_dict, "from_log": "/x.ezl"})
    assert spec["guard"]["rise"] == 0.0
    assert "from_log" not in json.dumps(load_spec(tiny_spec_dict)) or load_spec(tiny_spec_dict)["from_log"] is None


def test_a_job_started_from_a_log_replays_to_its_output(tiny_spec_dict, tmp_path):
    """Job B starts from job A's log: B's output equals `edgezo replay B` (A's steps, then B's), and a
    resume of B against another log is refused (the log's sha256 is pinned in B's header)."""
    from edgezo.testing.tiny import job_weights, replayed, same_tensors
    from edgezo.trainer import TrainingError, prepare_job_dir, run_job

    spec_a = load_spec({**tiny_spec_dict, "steps": 3, "eval_size": 0, "eval_every": 0})
    run_job(prepare_job_dir(tmp_path / "a", spec_a))
    spec_b = load_spec({**tiny_spec_dict, "steps": 2, "seed": 5, "eval_size": 0, "eval_every": 0,
                        "from_log": str(tmp_path / "a" / "seedlog.ezl")})
    run_job(prepare_job_dir(tmp_path / "b", spec_b))
    assert same_tensors(job_weights(tmp_path / "b"), replayed(tmp_path, tmp_path / "b"))
    assert not same_tensors(job_weights(tmp_path / "a"), job_weights(tmp_path / "b"))
    with open(tmp_path / "a" / "seedlog.ezl", "ab") as f:  # the start log changes under the job
        f.write(b"x")
    with pytest.raises(TrainingError, match="from log sha256"), pytest.warns(seedlog.TornRecordWarning):
        run_job(tmp_path / "b")


def test_the_server_refuses_to_federate_what_records_cannot_carry(tiny_spec_dict, tmp_path):
    from edgezo.fleet.server_app import fleet_spec

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(tiny_spec_dict))
    spec = fleet_spec({"spec": str(path), "set": "optim.lr=0.01;noise=auto", "seed": 3})
    assert (spec["steps"], spec["seed"], spec["noise"], spec["guard"]["rise"]) == (0, 3, "torch", 0.0)
    for sets, message in (("method=dizo", "method: dizo cannot be federated"),
                          ("method=fo", "method: fo cannot be federated"),
                          ("trainable=lora", "trainable: lora draws its adapters")):
        with pytest.raises(R.RecordError, match=message):
            fleet_spec({"spec": str(path), "set": sets})


# -- end to end ------------------------------------------------------------------------------------

def _wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := pred()):
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_fleet_of_three_learns_together_and_survives_a_device_killed_in_round_2(tiny_model_dir, tmp_path):
    """SuperLink + 4 SuperNodes, each with its own daemon, on loopback; 3 rounds. dev-2 is killed during
    round 2 (SuperNode, daemon, worker: a power loss) and restarted at once: the federation goes on
    without it in round 2, and it catches up by replay in round 3. dev-3 keeps a different base model:
    its records are rejected every round, with the reason. dev-0..2 end bit-identical, equal to
    `edgezo replay` of the federation's log."""
    from edgezo.cli import main as cli_main
    from edgezo.fleet.device import weights_digest
    from edgezo.fleet.launch import LocalFleet, split_rows
    from edgezo.testing.tiny import make_model_dir, tiny_spec

    spec = tiny_spec(tiny_model_dir, tmp_path / "data")
    spec.update(eval_size=8)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    other_model = make_model_dir(tmp_path / "other-model", seed=1)
    shards = split_rows(Path(spec["task"]["train"]), 4, [tmp_path / f"shard-{i}" for i in range(4)])
    fleet = LocalFleet(tmp_path / "fleet", shards, [Path(spec["task"]["eval"])] * 4, budget="3GiB",
                       node_config={3: {"model": str(other_model)}})
    jobs2 = fleet.device_dir(2) / "daemon" / "jobs"
    try:
        fleet.start()
        run = fleet.run_async({"rounds": 3, "steps-per-round": 2, "spec": str(tmp_path / "spec.json"),
                               "round-timeout": 40.0, "final-eval-size": 8})
        _wait(lambda: jobs2.is_dir() and any(p.name.startswith("fleet-r0002") for p in jobs2.iterdir()), 240,
              "dev-2's round-2 job")
        fleet.kill_device(2)
        fleet.start_daemon(2)
        fleet.wait_daemon(2)
        fleet.start_supernode(2)
        summary = fleet.wait(run, timeout=400)
    finally:
        fleet.stop()
    assert summary["status"] == "done", summary.get("error")
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert rounds[1]["merged"] == ["dev-0", "dev-1", "dev-2"]
    assert rounds[2]["merged"] == ["dev-0", "dev-1"]
    assert rounds[3]["merged"] == ["dev-0", "dev-1", "dev-2"]
    reasons = {(r, x["device"]): x["reason"] for r in rounds for x in rounds[r]["left_out"]}
    assert "no reply within 40 s" in reasons[(2, "dev-2")]
    assert "malformed records: wrong base-model hash" in reasons[(1, "dev-3")]  # the server's check
    for r in (2, 3):  # then the device itself refuses to start from a log for another base model
        assert "the device failed" in reasons[(r, "dev-3")] and "different base model hash" in reasons[(r, "dev-3")]
    assert summary["log_steps"] == 2 * (3 + 2 + 3)

    # every device rebuilt the same weights by replay, and they are what `edgezo replay` gives
    assert cli_main(["replay", summary["log"], "--out", str(tmp_path / "replayed")]) == 0
    want = weights_digest(tmp_path / "replayed")
    final = summary["final"]
    assert {d: final[d]["weights_sha256"] for d in ("dev-0", "dev-1", "dev-2")} == dict.fromkeys(
        ("dev-0", "dev-1", "dev-2"), want)
    assert "different base model hash" in final["dev-3"]["error"]
    assert all(0.0 <= final[d]["accuracy"] <= 1.0 for d in ("dev-0", "dev-1", "dev-2"))
    # the federation's log is a seed-log of records only: seeds and scalars, never weights
    header, frames = seedlog.read(Path(summary["log"]) / "seedlog.ezl")
    assert all(f.kind == seedlog.STEP and set(f.data) == {"step", "seeds", "grads", "lr", "wd", "r", "d", "k"}
               for f in frames)
    assert all(math.isfinite(g) for f in frames for g in f.data["grads"])
    # after its first round (which carries its seed-log header once) a device sends two step records
    up = [rounds[2]["devices"][d]["up_bytes"] for d in ("dev-0", "dev-1")]
    up += [rounds[3]["devices"][d]["up_bytes"] for d in ("dev-0", "dev-1")]
    weights = sum(f.stat().st_size for f in (tmp_path / "replayed").glob("*.safetensors"))
    assert max(up) < 400 and max(up) * 500 < weights
