"""Data formats, batch order, and the generation task on the tiny model."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from edgezo.data import DataError, batch_indices, read_rows
from edgezo.spec import load_spec
from edgezo.trainer import prepare_job_dir, run_job

ROWS = [{"text": f"a fine film number {i}", "label": "fresh" if i % 2 else "rotten"} for i in range(10)]


def test_csv_jsonl_and_datasets_directory_give_the_same_rows(tmp_path):
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(ROWS)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    for path in ("d.csv", "d.jsonl", "ds"):
        assert read_rows(tmp_path / path, "task.train") == ROWS, path


def test_unreadable_data_names_the_field(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="task.train: cannot parse"):
        read_rows(tmp_path / "bad.jsonl", "task.train")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="not .csv, .jsonl"):
        read_rows(tmp_path / "x.txt", "task.eval")


def test_batches_are_a_pure_function_of_step_and_cover_each_epoch():
    n, bs = 10, 4
    epoch = [i for s in range(5) for i in batch_indices(n, bs, s, seed=3)][:20]
    assert sorted(epoch[:10]) == list(range(10)) and sorted(epoch[10:20]) == list(range(10))
    assert batch_indices(n, bs, 7, seed=3) == batch_indices(n, bs, 7, seed=3)
    assert batch_indices(n, bs, 0, seed=3) != batch_indices(n, bs, 0, seed=4)


def test_generation_task_trains_and_reports_exact_match_and_f1(tiny_model_dir, tmp_path):
    qa = [{"question": f"what is {i} plus one", "answer": str(i + 1)} for i in range(12)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    spec = load_spec({
        "model": str(tiny_model_dir), "device": "cpu", "steps": 3, "batch_size": 4, "max_length": 32,
        "eval_size": 4, "optim": {"lr": 1e-3},
        "task": {"type": "generation", "train": str(tmp_path / "qa.jsonl"), "eval": str(tmp_path / "qa.jsonl"),
                 "text_field": "question", "answer_field": "answer", "template": "Q: {question}\nA:"},
    })
    report = run_job(prepare_job_dir(tmp_path / "job", spec))
    final = report["metrics"]["final"]
    assert {"exact_match", "f1", "loss"} <= set(final) and final["n"] == 4
    assert torch.isfinite(torch.tensor(final["loss"]))


def test_classification_never_computes_full_vocabulary_logits(tiny_model_dir, tmp_path, tiny_spec_dict):
    """The lm_head module is never called: logits are [batch, labels] from the verbalizer rows."""
    from edgezo.models import load
    from edgezo.perturb import Perturber, collect_params
    from edgezo.tasks import make_task

    spec = load_spec(tiny_spec_dict)
    model, tok, _ = load(spec["model"], "fp32", torch.device("cpu"))
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    task = make_task(spec["task"], model, tok, Perturber(collect_params(model, None)), 32, torch.device("cpu"))
    ex = task.encode(read_rows(spec["task"]["train"], "task.train")[:4], "train")
    assert task.logits(ex).shape == (4, 2)
    assert not calls


def test_bucketed_batches_are_pure_disjoint_and_pad_little():
    import random

    from edgezo.data import bucketed_batch

    rng = random.Random(0)
    lengths = [rng.randint(5, 64) for _ in range(3000)]
    bs = 16
    epoch = [bucketed_batch(lengths, bs, s, seed=3) for s in range(len(lengths) // bs)]
    flat = [i for b in epoch for i in b]
    assert len(flat) == len(set(flat)) == (len(lengths) // bs) * bs  # an epoch draws each sentence once at most
    assert all(len(b) == bs for b in epoch)
    assert bucketed_batch(lengths, bs, 7, seed=3) == bucketed_batch(list(lengths), bs, 7, seed=3)
    assert bucketed_batch(lengths, bs, 7, seed=3) != bucketed_batch(lengths, bs, 7, seed=4)
    assert bucketed_batch(lengths, bs, 0, seed=3) != bucketed_batch(lengths, bs, len(epoch), seed=3)  # next epoch
    padded = sum(bs * max(lengths[i] for i in b) for b in epoch) / sum(lengths[i] for b in epoch for i in b)
    assert padded < 1.1  # random batches of these lengths pad to about 1.6x
    means = [sum(lengths[i] for i in b) / bs for b in epoch[:20]]
    assert max(means) - min(means) > 20  # short and long batches still come in random order
