"""bench/stagger.py in a small configuration: leases keep 3 DiZO-FO jobs under a budget that their
heavy phases would break without them. Also the FO projection lease size (trainer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_leases_keep_dizo_fo_jobs_under_budget_and_no_leases_exceed(tmp_path):
    import stagger

    out = tmp_path / "stagger.json"
    # seq 256: the projection's extra memory (eager attention probabilities) is several times the
    # ZO step's own swing, so "one projection fits, two do not" holds with a margin on both sides.
    rc = stagger.main(["--jobs", "3", "--steps", "8", "--interval", "4", "--iters", "1", "--layers", "4", "--batch", "8",
                       "--seq", "256",
                       "--workdir", str(tmp_path / "work"), "--json", str(out), "--timeout", "900"])
    assert rc == 0
    res = json.loads(out.read_text())
    budget = res["budget_bytes"]
    cal = res["calibration"]
    assert 3 * cal["projection_peak_bytes"] > budget, "the budget must be below the sum of heavy-phase peaks"
    with_leases, without = res["modes"]["leases"], res["modes"]["no-leases"]
    assert with_leases["failed"] == 0 and with_leases["ooms"] == 0
    assert with_leases["all_projections_ran"], [(j["id"], j["projections"]) for j in with_leases["jobs"]]
    assert all(j["projections"] == 2 for j in with_leases["jobs"])  # 8 steps / interval 4
    # the last projections queue with no steps left to overlap: they wait their turn, nobody is paused
    assert with_leases["pauses"] == 0, [j["pause_reasons"] for j in with_leases["jobs"]]
    assert with_leases["device_peak_bytes"] <= budget, (with_leases["device_peak_bytes"], budget)
    assert with_leases["samples"] > 100  # the 20 ms sampler really watched the run
    assert without["device_peak_bytes"] > budget, (without["device_peak_bytes"], budget)


def _engine(spec_extra: dict, attn: str = "eager"):
    cfg = SimpleNamespace(hidden_size=128, num_hidden_layers=6, intermediate_size=256, num_attention_heads=32,
                          _attn_implementation=attn)
    spec = {"precision": "fp32", "dizo": {"checkpointing": False, **spec_extra}}
    return SimpleNamespace(model=SimpleNamespace(config=cfg), spec=spec, method=SimpleNamespace(heavy=True))


class _Meter:
    def __init__(self, phases: dict):
        self.phases = phases

    def summary(self) -> dict:
        return {"phases": self.phases}


def test_projection_lease_estimate_then_measurement():
    from edgezo.trainer import projection_lease_bytes

    eager = projection_lease_bytes(_engine({}), 16, 128)
    probs = 16 * 32 * 128 * 128 * 4
    assert 6 * probs < eager < 6 * probs + 200 * 2**20  # eager attention keeps every layer's probabilities
    assert projection_lease_bytes(_engine({}, attn="sdpa"), 16, 128) < eager - 6 * probs + 1
    assert projection_lease_bytes(_engine({"checkpointing": True}), 16, 128) < eager / 3
    no_fo = _engine({})
    no_fo.method.heavy = False
    assert projection_lease_bytes(no_fo, 16, 128) == 0
    # no projection measured yet: the estimate; afterwards the measured peak over the steady level (+10 %)
    assert projection_lease_bytes(_engine({}), 16, 128, _Meter({"zo_step": {"avg_bytes": 400}})) == eager
    measured = _Meter({"zo_step": {"peak_bytes": 450, "avg_bytes": 400 * 2**20},
                       "projection": {"peak_bytes": 600 * 2**20, "avg_bytes": 550}})
    assert projection_lease_bytes(_engine({}), 16, 128, measured) == int(1.1 * 200 * 2**20)
