"""What makes ZO learn in an edge budget: the shared frozen prefix, the normalised estimator (fzoo)
and the divergence guard — each exact under replay and resume, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from edgezo.hooks import TrainerHooks
from edgezo.prefix import first_trainable_layer
from edgezo.spec import SpecError, load_spec
from edgezo.testing.tiny import PauseAt, job_events, job_weights, make_job, replayed, same_tensors
from edgezo.trainer import EventLog, Paused, build_engine, run_job, shared_prefix

# -- the frozen prefix ------------------------------------------------------------------------------


def test_top_k_trains_the_last_blocks_and_the_final_norm_only(tiny_spec_dict):
    engine = build_engine(load_spec({**tiny_spec_dict, "trainable": "top1"}))
    names = [p.name for p in engine.params]
    assert names and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names and not any("embed" in n for n in names)
    from edgezo.models import decoder_of

    assert first_trainable_layer(decoder_of(engine.model), engine.params) == 1
    top0 = build_engine(load_spec({**tiny_spec_dict, "trainable": "top0"}))  # the final norm alone
    assert [p.name for p in top0.params] == ["model.norm.weight"]
    assert first_trainable_layer(decoder_of(top0.model), top0.params) == 2  # every block is frozen
    full = build_engine(load_spec(tiny_spec_dict))  # embeddings train: nothing below is frozen
    assert first_trainable_layer(decoder_of(full.model), full.params) == 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("trainable, cut", [("top1", 1), ("top0", 2)])
def test_shared_prefix_gives_the_full_forwards_losses_bit_for_bit(tiny_spec_dict, tmp_path, precision, trainable, cut):
    from edgezo.tasks import make_task

    spec = load_spec({**tiny_spec_dict, "trainable": trainable, "precision": precision})
    engine = build_engine(spec)
    task = make_task(spec["task"], engine.model, engine.tokenizer, engine.perturber, spec["max_length"],
                     engine.device)
    from edgezo.data import read_rows

    batch = task.encode(read_rows(spec["task"]["train"], "t")[:4], "t")
    events = EventLog(tmp_path / "events.jsonl", TrainerHooks())
    prefix = shared_prefix(engine, task, batch, events)
    assert prefix is not None and prefix.cut == cut
    with torch.no_grad():
        full = [task.objective(batch)]
        for seed in (3, 4):
            with engine.perturber.active(seed, 1e-2):
                full.append(task.objective(batch))
        task.prefix = prefix
        objective = task.step_objective(batch)
        shared = [objective.base()]
        for seed in (3, 4):
            with engine.perturber.active(seed, 1e-2):
                shared.append(objective())
    assert shared == full and objective.forwards == 1  # three losses, one full forward
    assert full[1] != full[0]  # the perturbation reached the suffix


# -- fzoo -----------------------------------------------------------------------------------------


def test_fzoo_needs_two_directions_and_names_the_field(tiny_spec_dict):
    with pytest.raises(SpecError) as e:
        load_spec({**tiny_spec_dict, "method": "fzoo", "optim": {"perturbations": 1}})
    assert e.value.field == "optim.perturbations"
    for bad, field in (({"guard": {"lr_factor": 2.0}}, "guard.lr_factor"), ({"trainable": "top01"}, "trainable"),
                       ({"guard": {"spam": 1}}, "guard.spam")):
        with pytest.raises(SpecError) as e:
            load_spec({**tiny_spec_dict, **bad})
        assert e.value.field == field


def test_fzoo_on_the_top_block_lowers_the_training_loss(tmp_path, tiny_spec_dict):
    job = make_job(tmp_path, tiny_spec_dict, method="fzoo", trainable="top1", steps=30, eval_size=0,
               optim={"lr": 0.05, "eps": 1e-3, "perturbations": 8})
    run_job(job)
    losses = [e["loss"] for e in job_events(job, "step")]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"fzoo did not learn: {first:.4f} -> {last:.4f}"
    assert job_events(job, "prefix")[0]["frozen_blocks"] == 1
    assert same_tensors(job_weights(job), replayed(tmp_path, job))


def test_fzoo_resume_after_a_pause_equals_an_uninterrupted_run(tmp_path, tiny_spec_dict):
    kw = dict(method="fzoo", trainable="top1", steps=12, eval_size=0, snapshot_every=5,
              optim={"lr": 0.05, "eps": 1e-3, "perturbations": 4})
    ref = make_job(tmp_path, tiny_spec_dict, name="ref", **kw)
    run_job(ref)
    job = make_job(tmp_path, tiny_spec_dict, name="paused", **kw)
    with pytest.raises(Paused):
        run_job(job, PauseAt(7))
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))


# -- the divergence guard -------------------------------------------------------------------------

DIVERGING = dict(method="fzoo", trainable="full", steps=24, eval_size=0, snapshot_every=0,
                 optim={"lr": 3.0, "eps": 1e-3, "perturbations": 4},
                 guard={"rise": 0.1, "span": 4, "lr_factor": 0.25})


def test_guard_rolls_back_a_forced_divergence_and_replay_follows_it(tmp_path, tiny_spec_dict):
    job = make_job(tmp_path, tiny_spec_dict, **DIVERGING)
    report = run_job(job)
    rollbacks = job_events(job, "rollback")
    assert rollbacks, "lr 3.0 should have diverged and tripped the guard"
    assert rollbacks[0]["lr"] == pytest.approx(3.0 * 0.25)
    assert report["guard"]["rollbacks"] == len(rollbacks)
    assert same_tensors(job_weights(job), replayed(tmp_path, job))

    unguarded = make_job(tmp_path, tiny_spec_dict, name="unguarded", **{**DIVERGING, "guard": {"rise": 0, "held_out": 0}})
    run_job(unguarded)
    mean = lambda j: sum(e["loss"] for e in job_events(j, "step")[-6:]) / 6  # noqa: E731
    assert mean(job) < mean(unguarded)


def test_guard_resume_across_a_rollback_equals_an_uninterrupted_run(tmp_path, tiny_spec_dict):
    ref = make_job(tmp_path, tiny_spec_dict, name="ref", **DIVERGING)
    run_job(ref)
    first = job_events(ref, "rollback")[0]["step"]
    job = make_job(tmp_path, tiny_spec_dict, name="paused", **DIVERGING)
    with pytest.raises(Paused):
        run_job(job, PauseAt(first + 2))
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert [e["step"] for e in job_events(job, "rollback")] == [e["step"] for e in job_events(ref, "rollback")]


# -- what the report says -------------------------------------------------------------------------


def test_gain_is_paired_over_the_same_sentences_and_shown():
    from edgezo.report import accuracy_gain, render

    before = {"accuracy": 0.5, "n": 8, "correct": "11110000"}
    after = {"accuracy": 0.75, "n": 8, "correct": "11111100"}
    g = accuracy_gain(before, after)
    assert g["points"] == pytest.approx(25.0) and g["better"] == 2 and g["worse"] == 0
    lo, hi = g["interval95"]
    assert lo < 25.0 < hi and hi - lo < 2 * 1.96 * 100 * (0.5 / 8) ** 0.5  # tighter than two unpaired intervals
    assert accuracy_gain(before, {"accuracy": 0.5, "n": 4, "correct": "1111"}) is None  # not the same sentences
    text = render({"metrics": {"zero_shot": before, "final": after, "gain": g},
                   "guard": {"events": [{"step": 30, "to": 12, "lr": 0.005, "best_loss": 0.4}]}})
    assert "gain       +25.0 points" in text and "back to step 12" in text


def test_a_real_run_reports_its_gain(tmp_path, tiny_spec_dict):
    job = make_job(tmp_path, tiny_spec_dict, method="fzoo", trainable="top1", steps=4,
               optim={"lr": 0.05, "eps": 1e-3, "perturbations": 4})
    report = run_job(job)
    g = report["metrics"]["gain"]
    zs, final = report["metrics"]["zero_shot"], report["metrics"]["final"]
    assert g["n"] == 16 and g["points"] == pytest.approx(100 * (final["accuracy"] - zs["accuracy"]))
    assert "correct" not in report["metrics"]["history"][0]


# -- the feature cache (no block trains) ---------------------------------------------------------------

FEATURES = dict(method="fzoo", trainable="top0", steps=20, eval_size=0, snapshot_every=0, batch_size=4,
                optim={"lr": 0.5, "eps": 1e-3, "perturbations": 8}, task_train_size=16)


def _feature_job(tmp_path, spec_dict, name):
    kw = {k: v for k, v in FEATURES.items() if k != "task_train_size"}
    spec = {**spec_dict, **kw, "task": {**spec_dict["task"], "train_size": FEATURES["task_train_size"]}}
    return make_job(tmp_path, spec, name=name)


def test_with_no_block_trainable_an_example_seen_before_costs_no_forward(tmp_path, tiny_spec_dict):
    """train_size 16 at batch 4 is 4 batches an epoch: the first epoch runs one full forward a step,
    every later step reuses the kept features (0 full forwards), and the loss still goes down."""
    job = _feature_job(tmp_path, tiny_spec_dict, "job")
    run_job(job)
    steps = job_events(job, "step")
    assert [s["forwards"] for s in steps[:4]] == [1.0] * 4
    assert all(s["forwards"] == 0.0 for s in steps[4:]), [s["forwards"] for s in steps]
    assert sum(s["loss"] for s in steps[-4:]) < sum(s["loss"] for s in steps[:4])


def test_feature_cache_resume_equals_an_uninterrupted_run_and_replay(tmp_path, tiny_spec_dict):
    """A resumed job recomputes the batches of the steps it skipped and keeps the same bits, so it
    equals the uninterrupted run; replay of either seed-log gives the same weights."""
    ref = _feature_job(tmp_path, tiny_spec_dict, "ref")
    run_job(ref)
    job = _feature_job(tmp_path, tiny_spec_dict, "paused")
    with pytest.raises(Paused):
        run_job(job, PauseAt(11))
    run_job(job)
    assert same_tensors(job_weights(ref), job_weights(job))
    assert same_tensors(job_weights(ref), replayed(tmp_path, job))
    again = _feature_job(tmp_path, tiny_spec_dict, "again")
    run_job(again)
    assert [s["loss"] for s in job_events(again, "step")] == [s["loss"] for s in job_events(ref, "step")]


def test_train_size_must_be_a_positive_integer(tiny_spec_dict):
    for bad in (0, -3, 2.5, "many"):
        with pytest.raises(SpecError, match="task.train_size"):
            load_spec({**tiny_spec_dict, "task": {**tiny_spec_dict["task"], "train_size": bad}})
