"""Pure policies: estimates, admission, lease choice. No I/O, time is an argument."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from policies import admission, leases
from policies import memory as mem

MiB, GiB = mem.MiB, mem.GiB


def test_param_count_matches_smollm2_135m():
    n = mem.count_params(mem.SMOLLM2_135M)
    assert 130e6 < n < 140e6


def test_estimate_scales_with_dtype_batch_and_runtime():
    cfg = mem.SMOLLM2_135M
    fp32 = mem.estimate(cfg, precision="fp32", batch_size=16, max_length=128)
    fp16 = mem.estimate(cfg, precision="fp16", batch_size=16, max_length=128)
    big = mem.estimate(cfg, precision="fp32", batch_size=64, max_length=128)
    assert fp32.weights == 2 * fp16.weights
    assert big.activations > 3 * fp32.activations
    assert fp32.steady == fp32.runtime + fp32.weights + fp32.activations
    cuda = mem.estimate(cfg, device="cuda")
    assert cuda.runtime == mem.RUNTIME_OVERHEAD["cuda"]
    assert mem.estimate(cfg, runtime_overhead=0).runtime == 0
    dizo = mem.estimate(cfg, method="dizo")
    assert dizo.steady == fp32.steady and dizo.heavy["projection"] > 0  # the anchor streams from safetensors
    gguf = mem.estimate(cfg, method="dizo", anchor_in_memory=True)  # a GGUF model's anchor is a host copy
    assert gguf.steady - fp32.steady == 30 * (576 * 576 + 576 * 192) * 4


def test_a_classification_forward_counts_no_vocabulary_wide_logits():
    """The engine multiplies the last hidden state by the verbalizer rows only; the estimate used to add
    [batch, seq, vocab] fp32 logits (192 MiB at the default job's shape) that are never built.
    Generation does build logits over the answer positions, and they are counted."""
    cfg = mem.SMOLLM2_135M
    cls = mem.estimate(cfg, batch_size=16, max_length=64)
    gen = mem.estimate(cfg, batch_size=16, max_length=64, task_type="generation")
    assert cls.activations < 40 * MiB
    assert gen.activations - cls.activations == 16 * 32 * cfg["vocab_size"] * 4


def test_trainable_bytes_follow_the_trainable_set():
    cfg = mem.SMOLLM2_135M
    weights = mem.count_params(cfg) * 4
    lora = mem.trainable_bytes(cfg, "lora", weights, {"rank": 8, "targets": ["q_proj", "v_proj"]})
    # q: 576 -> 576, v: 576 -> 3 x 64 = 192; rank 8 fp32 factors on each of 30 layers
    assert lora == 30 * 8 * 4 * ((576 + 576) + (576 + 192))
    assert mem.trainable_bytes(cfg, "top3", weights) == weights * 3 // 30
    assert mem.trainable_bytes(cfg, "full", weights) == weights
    fo_lora = mem.estimate(cfg, method="fo", trainable="lora").heavy["fo_step"]
    fo_full = mem.estimate(cfg, method="fo", trainable="full").heavy["fo_step"]
    assert fo_full - fo_lora == 3 * (weights - lora)


def test_eager_attention_adds_its_probabilities_and_sdpa_does_not():
    cfg = dict(mem.SMOLLM2_135M)
    sdpa = mem.estimate(cfg, batch_size=16, max_length=128)
    eager = mem.estimate({**cfg, "attn_implementation": "eager"}, batch_size=16, max_length=128)
    assert eager.activations - sdpa.activations == 16 * 9 * 128 * 128 * 4


def test_refine_prefers_measurement():
    assert mem.refine(900, None) == 900
    assert mem.refine(900, 400) == 400


def test_fmt_bytes():
    assert mem.fmt_bytes(int(3.1 * GiB)) == "3.1 GiB"
    assert mem.fmt_bytes(512 * MiB) == "512.0 MiB"
    assert mem.fmt_bytes(None) == "-"


def C(job, need, at, resume=False):
    return admission.Candidate(job, need, at, resume)


def test_admission_fits_two_and_says_why_the_third_waits():
    ds = admission.admit([C("a", 2 * GiB, 0), C("b", 2 * GiB, 1), C("c", int(3.1 * GiB), 2)],
                         budget=6 * GiB, committed=0, device_free=None, now=10)
    assert [d.start for d in ds] == [True, True, False]
    assert ds[2].reason == "waiting: needs 3.1 GiB, 2.0 GiB free under budget 6.0 GiB"


def test_admission_counts_external_pressure_through_device_free():
    ds = admission.admit([C("a", 1 * GiB, 0)], budget=6 * GiB, committed=0, device_free=int(1.2 * GiB),
                         reserve=512 * MiB, now=0)
    assert not ds[0].start and "device has 1.2 GiB free" in ds[0].reason


def test_admission_backfills_until_the_head_has_waited_too_long():
    cands = [C("big", 5 * GiB, 0), C("small", 1 * GiB, 1)]
    early = admission.admit(cands, budget=6 * GiB, committed=2 * GiB, device_free=None, now=10, max_wait_s=60)
    assert [d.start for d in early] == [False, True]
    late = admission.admit(cands, budget=6 * GiB, committed=2 * GiB, device_free=None, now=61, max_wait_s=60)
    assert [d.start for d in late] == [False, False]
    assert "behind big" in late[1].reason


def test_admission_resumed_jobs_first_and_max_jobs():
    ds = admission.admit([C("new", 1, 0), C("old", 1, 5, resume=True)], budget=10, committed=0,
                         device_free=None, now=6, max_jobs=1)
    assert [(d.job_id, d.start) for d in ds] == [("old", True), ("new", False)]


def test_pressure_victim_is_the_youngest():
    assert admission.pressure_victim([("a", 1.0), ("b", 5.0)], over_bytes=1) == "b"
    assert admission.pressure_victim([("a", 1.0)], over_bytes=0) is None


def R(key, nbytes, since, period=None):
    return leases.Request(key, key.split("/")[0], "eval", nbytes, since, period)


def test_fifo_grants_in_order_while_they_fit():
    reqs = [R("a/eval", 3, 0), R("b/eval", 3, 1), R("c/eval", 3, 2)]
    assert leases.choose(reqs, headroom=7, now=3) == ["a/eval", "b/eval"]


def test_fifo_bounded_wait_blocks_overtaking():
    reqs = [R("big/eval", 8, 0), R("small/eval", 2, 1)]
    assert leases.choose(reqs, headroom=5, now=5, max_wait_s=30) == ["small/eval"]
    assert leases.choose(reqs, headroom=5, now=31, max_wait_s=30) == []
    assert leases.choose(reqs, headroom=8, now=31, max_wait_s=30) == ["big/eval"]


def test_phase_offsets_spread_a_group_evenly():
    offs = leases.phase_offsets({"a": 10.0, "b": 10.5, "c": 9.8, "z": 60.0})
    same = sorted(offs[j] for j in ("a", "b", "c"))
    assert same[0] == 0 and abs(same[1] - 10.1 / 3) < 1e-6 and abs(same[2] - 20.2 / 3) < 1e-6
    assert offs["z"] == 0


def test_phase_offset_policy_spaces_grants_within_a_group():
    reqs = [R("a/eval", 1, 0, 9.0), R("b/eval", 1, 0.1, 9.0), R("c/eval", 1, 0.2, 9.0)]
    # plenty of memory, but b and c were just preceded by a: they wait T/n = 3 s
    periods = {"a": 9.0, "b": 9.0, "c": 9.0}
    assert leases.choose(reqs, headroom=100, now=1, policy="phase-offset", periods=periods) == ["a/eval"]
    later = reqs[1:]
    assert leases.choose(later, headroom=100, now=2, policy="phase-offset", last_grant={"a": 1}, periods=periods) == []
    assert leases.choose(later, headroom=100, now=4.1, policy="phase-offset", last_grant={"a": 1},
                         periods=periods) == ["b/eval"]
    # bounded: an overdue request is not held back by spacing
    assert leases.choose(reqs[2:], headroom=100, now=40, policy="phase-offset", last_grant={"b": 39.9},
                         max_wait_s=30) == ["c/eval"]


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError):
        leases.choose([], headroom=1, now=0, policy="lifo")


def test_policies_are_pure_stdlib():
    """Decisions only: no I/O, no clock, no torch; the worker↔daemon contract (edgezo/protocol.py,
    itself stdlib only) is the one project module they may name."""
    allowed = {"__future__", "dataclasses", "typing", "edgezo.protocol"}
    protocol = Path(admission.__file__).parent.parent / "edgezo" / "protocol.py"
    for path in [*Path(admission.__file__).parent.glob("*.py"), protocol]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]
            else:
                continue
            for name in names:
                ok = {"__future__", "enum", "json", "re", "typing"} if path == protocol else allowed
                assert name in ok or name.split(".")[0] in ok, f"{path.name} imports {name}"
        src = path.read_text()
        assert "time.time(" not in src and "open(" not in src, path.name


# --- lease deadlock -------------------------------------------------------------------------------

def _req(job: str, nbytes: int, phase: str = "projection") -> leases.Request:
    return leases.Request(f"{job}/{phase}", job, phase, nbytes, since=0.0)


def test_unblock_pauses_the_youngest_when_every_running_job_waits_on_a_lease_that_cannot_fit():
    running = [leases.Holder("a", 1.0, 400), leases.Holder("b", 2.0, 400), leases.Holder("c", 3.0, 400)]
    waiting = [_req("a", 300), _req("b", 300), _req("c", 300)]
    d = leases.unblock(running, waiting, granted=0, headroom=200, budget=1400)
    assert d is not None and d.action == "pause" and d.job_id == "c" and "deadlock" in d.reason


@pytest.mark.parametrize("change", ["one fits", "one holds a lease", "one is not waiting", "alone"])
def test_unblock_leaves_leases_alone_when_something_can_still_move(change):
    running = [leases.Holder("a", 1.0, 400), leases.Holder("b", 2.0, 400)]
    waiting = [_req("a", 300), _req("b", 300)]
    kw = {"granted": 0, "headroom": 200, "budget": 1200}
    if change == "one fits":
        waiting[1] = _req("b", 150)
    elif change == "one holds a lease":
        kw["granted"] = 1
    elif change == "one is not waiting":
        waiting = waiting[:1]
    else:  # a lone job whose phase would fit under the budget: something else holds the memory
        running, waiting = running[:1], waiting[:1]
    assert leases.unblock(running, waiting, **kw) is None


def test_unblock_fails_a_job_whose_phase_cannot_fit_even_alone():
    running = [leases.Holder("a", 1.0, 900)]
    d = leases.unblock(running, [_req("a", 400)], granted=0, headroom=100, budget=1000, fmt=lambda n: f"{n}B")
    assert d is not None and d.action == "fail" and d.job_id == "a"
    assert "400B" in d.reason and "100B" in d.reason and "--budget" in d.reason
