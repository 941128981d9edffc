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
        # 3-9 steps on 64 rows: the held-out watch's 12 sentences could never show a gain, so it would
        # end every job on its start weights; tests/test_guard.py turns it on with rows built for it
        "guard": {"held_out": 0},
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


def make_job(tmp_path: Path, spec_dict: dict, name: str = "job", **overrides) -> Path:
    """A prepared job directory tmp_path/name for spec_dict with top-level fields overridden."""
    from edgezo.spec import load_spec
    from edgezo.trainer import prepare_job_dir

    return prepare_job_dir(tmp_path / name, load_spec({**spec_dict, **overrides}))


def replayed(tmp_path: Path, job: Path, name: str = "replayed") -> dict:
    """The weights `edgezo replay --from-base` rebuilds from a job's seed-log."""
    from safetensors.torch import load_file

    from edgezo.cli import main as cli_main

    assert cli_main(["replay", str(job), "--out", str(tmp_path / name), "--from-base"]) == 0
    out = {}
    for f in (tmp_path / name).glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def job_events(job: Path, kind: str) -> list[dict]:
    """A job's events.jsonl records of one kind ("step", "rollback", "check", ...), in order."""
    lines = (Path(job) / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


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


def make_gguf(model_dir: Path, path: Path) -> Path:
    """The tiny model as an F32 GGUF file, written the way llama.cpp's converter writes a Llama: its
    hyper-parameters and byte-level BPE vocabulary as metadata, q/k rows permuted into rotary pairs.

    Written here with gguf's writer directly (not with edgezo's exporter), so an export test that uses
    it as the base checks the exporter against an independent writer and transformers' loader."""
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType, TokenType
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w, n):  # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // heads)
    w.add_vocab_size(len(tokens))
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm":
                 "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    state = load_file(str(Path(model_dir) / "model.safetensors"))
    for hf, gg in names.items():
        t = state[hf].float().numpy()
        if gg.endswith("attn_q.weight"):
            t = permute(t, heads)
        elif gg.endswith("attn_k.weight"):
            t = permute(t, kv_heads)
        w.add_tensor(gg, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
