"""Tiny, fully offline stand-ins for the real model and data, built in-process.

A byte-level BPE tokenizer trained on a synthetic review corpus and a 2-layer Llama from a
config with fixed random weights: the same code paths as SmolLM2, in milliseconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from edgezo.hooks import TrainerHooks

POSITIVE = ["wonderful", "moving", "brilliant", "charming", "smart", "funny", "gripping", "lovely"]
NEGATIVE = ["dull", "tedious", "clumsy", "boring", "messy", "lifeless", "awful", "bland"]
NOUNS = ["film", "movie", "story", "script", "cast", "plot", "ending", "drama"]


def review(rng: random.Random, label: str) -> str:
    words = POSITIVE if label == "fresh" else NEGATIVE
    return f"a {rng.choice(words)} {rng.choice(NOUNS)} , {rng.choice(words)} and {rng.choice(words)} ."


def write_reviews(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            label = "fresh" if i % 2 == 0 else "rotten"
            f.write(json.dumps({"text": review(rng, label), "label": label}) + "\n")
    return path


def make_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    corpus = [f"Review: {review(rng, lab)}\nSentiment: positive negative" for lab in ["fresh", "rotten"] * 200]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def make_model_dir(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A tiny tied-embedding Llama with its tokenizer, saved as a local HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


def tiny_spec(model_dir: Path, data_dir: Path, **overrides) -> dict:
    train = write_reviews(Path(data_dir) / "train.jsonl", 64, seed=0)
    dev = write_reviews(Path(data_dir) / "dev.jsonl", 16, seed=1)
    spec = {
        "name": "tiny",
        "model": str(model_dir),
        "precision": "fp32",
        "trainable": "full",
        "method": "mezo",
        "optim": {"lr": 1e-3, "eps": 1e-3},
        "task": {
            "type": "classification",
            "train": str(train),
            "eval": str(dev),
            "text_field": "text",
            "label_field": "label",
            "template": "Review: {text}\nSentiment:",
            "labels": {"rotten": " negative", "fresh": " positive"},
        },
        "steps": 6,
        "batch_size": 4,
        "max_length": 32,
        "eval_every": 3,
        "eval_size": 16,
        "seed": 0,
        "device": "cpu",
    }
    for k, v in overrides.items():
        spec[k] = v
    return spec


def job_weights(job_dir: Path) -> dict:
    """The tensors a finished job exported, by name."""
    from safetensors.torch import load_file

    out = {}
    output = json.loads((Path(job_dir) / "spec.json").read_text())["output"]
    for f in sorted((Path(job_dir) / output).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_tensors(a: dict, b: dict) -> bool:
    """The same names and bit-identical tensors."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def replayed(tmp_path: Path, job: Path, name: str = "replayed") -> dict:
    """The weights `edgezo replay --from-base` rebuilds from a job's seed-log."""
    from safetensors.torch import load_file

    from edgezo.cli import main as cli_main

    assert cli_main(["replay", str(job), "--out", str(tmp_path / name), "--from-base"]) == 0
    out = {}
    for f in (tmp_path / name).glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def rewrite_log(path: Path, header: dict, frames: list) -> None:
    """Replace a seed-log with one holding `header` and `frames` (to forge or cut one)."""
    from edgezo import seedlog

    tmp = path.with_name("rewritten.ezl")
    w = seedlog.SeedLogWriter.create(tmp, header, 1)
    for f in frames:
        w.append(f.kind, f.data)
    w.close()
    tmp.replace(path)


class PauseAt(TrainerHooks):
    """Trainer hooks that ask the run to pause once `step` steps were taken (a kill, politely)."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def on_event(self, kind, data):
        if kind == "step":
            self.seen += 1

    def control(self):
        return "pause" if self.seen >= self.step else "run"
