"""How much memory a job needs: the one estimator, from the model config, before anything is loaded.

Pure arithmetic on a config mapping (the HF `config.json` fields, or a GGUF's read into them). The
daemon admits on the steady figure; the worker sizes its heavy-phase leases with the same functions
on the loaded model's config; the worker's first measured step replaces the steady estimate (see
`refine`) and a heavy phase's measured peak replaces its estimate the next time it comes round.
`python bench/estimate.py` prints each figure against what the default job measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgezo.protocol import Phase

MiB = 1024**2
GiB = 1024**3

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}

# The packaged default model (SmolLM2-135M), for specs that say `model: default`.
SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
}

# What a worker costs before its model: the Python/torch runtime (CPU RSS) or the CUDA context.
# A checkpointed backward holds about twice the activations it keeps (the gradients of each recomputed
# layer's activations, the allocator's cache): measured with bench/estimate.py (fo on LoRA, SmolLM2-135M).
FO_BACKWARD_FACTOR = 2
RUNTIME_OVERHEAD = {"cpu": 464 * MiB, "cuda": 512 * MiB}  # cpu: measured, bench/estimate.py


@dataclass(frozen=True)
class Footprint:
    params: int
    weights: int
    activations: int
    runtime: int
    steady: int  # what a job holds between heavy phases: runtime + weights + one forward
    heavy: dict[str, int] = field(default_factory=dict)  # extra bytes a heavy phase asks a lease for


def count_params(cfg: dict) -> int:
    """Decoder-only transformer parameter count from the usual HF config fields."""
    v = int(cfg.get("vocab_size", 32000))
    h = int(cfg.get("hidden_size", 768))
    inter = int(cfg.get("intermediate_size", 4 * h))
    n_layers = int(cfg.get("num_hidden_layers", 12))
    heads = int(cfg.get("num_attention_heads", 12))
    kv = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or h // max(heads, 1))
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * h * inter  # gate, up, down
    per_layer = attn + mlp + 2 * h
    embed = v * h * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return embed + n_layers * per_layer + h


def _dims(cfg: dict) -> tuple[int, int, int, int]:
    """(hidden, intermediate, layers, heads) with the usual HF defaults."""
    h = int(cfg.get("hidden_size", 768))
    return h, int(cfg.get("intermediate_size", 4 * h)), int(cfg.get("num_hidden_layers", 12)), \
        int(cfg.get("num_attention_heads", 12))


def attention_probs(cfg: dict, batch: int, seq: int) -> int:
    """One layer's [batch, heads, seq, seq] fp32 attention probabilities, where the attention builds
    them (`attn_implementation: eager`); fused kernels (sdpa, transformers' default, and flash) keep
    only per-row statistics."""
    impl = cfg.get("attn_implementation") or cfg.get("_attn_implementation") or "sdpa"
    return batch * _dims(cfg)[3] * seq * seq * 4 if impl == "eager" else 0


@dataclass(frozen=True)
class Activations:
    """The pieces every phase's activation figure adds up, in bytes at one batch and length."""

    layer_input: int  # one layer's input (what a checkpointed backward keeps per layer)
    layers: int
    saved_per_layer: int  # what one layer keeps for its backward (measured on Llama: ~6h + 3i a token)
    working: int  # one layer's forward working set (~4h + 3i a token)


def activations(cfg: dict, batch: int, seq: int, dtype_bytes: int) -> Activations:
    h, inter, layers, _ = _dims(cfg)
    tokens, probs = batch * seq, attention_probs(cfg, batch, seq)
    return Activations(tokens * h * dtype_bytes, layers, tokens * (6 * h + 3 * inter) * dtype_bytes + probs,
                       tokens * (4 * h + 3 * inter) * dtype_bytes + probs)


def head_logits(cfg: dict, batch: int, seq: int, task_type: str = "classification") -> int:
    """The fp32 logits a loss builds: classification multiplies the last hidden state by the verbalizer
    rows only ([batch, labels], nothing to count); generation the answer positions by the whole output
    embedding (at most half the sequence)."""
    return batch * (seq // 2) * int(cfg.get("vocab_size", 32000)) * 4 if task_type == "generation" else 0


def forward_activations(cfg: dict, batch: int, seq: int, dtype_bytes: int, task_type: str = "classification") -> int:
    """Peak live activations of one no-grad forward: one layer's working set plus the head's logits."""
    return activations(cfg, batch, seq, dtype_bytes).working + head_logits(cfg, batch, seq, task_type)


def eval_extra(cfg: dict, batch: int, seq: int, dtype_bytes: int) -> int:
    """A rough upper bound on what an eval forward adds over the steady state (the eval lease)."""
    h, inter, layers, _ = _dims(cfg)
    tokens = batch * seq
    return int(tokens * (4 * h + 2 * inter) * dtype_bytes * 2 + tokens * h * layers * dtype_bytes // 4
               + 2 * attention_probs(cfg, batch, seq))  # scores and probabilities live at once


def projection_extra(cfg: dict, batch: int, seq: int, dtype_bytes: int, checkpointing: bool = False) -> int:
    """What DiZO's first-order projection adds over the steady state: the activations autograd keeps
    for the backward from the loss down to the first projected layer (every layer's input only, with
    checkpointing, plus one layer recomputed), and one layer's forward working set on top."""
    a = activations(cfg, batch, seq, dtype_bytes)
    saved = a.layers * a.layer_input + a.saved_per_layer if checkpointing else a.layers * a.saved_per_layer
    return int(saved + a.working)


def fo_extra(cfg: dict, batch: int, seq: int, dtype_bytes: int, trainable_bytes: int) -> int:
    """What a `method: fo` run holds over the loaded model for its whole run (one lease): a
    checkpointed backward's activations (or an eval forward, if larger), plus gradients and AdamW's
    two moments, each the size of the trainable tensors."""
    a = activations(cfg, batch, seq, dtype_bytes)
    acts = FO_BACKWARD_FACTOR * (a.layers * a.layer_input + a.saved_per_layer + a.working)
    return int(max(acts, eval_extra(cfg, batch, seq, dtype_bytes)) + 3 * trainable_bytes)


def _linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Linear of a Llama-style block, by its module name."""
    h, inter, _, heads = _dims(cfg)
    kv = int(cfg.get("num_key_value_heads", heads)) * int(cfg.get("head_dim") or h // max(heads, 1))
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def linear_bytes(cfg: dict, targets: list[str], dtype_bytes: int) -> int:
    """Bytes of the named Linear weights over every block (DiZO's projected layers)."""
    shapes = _linear_shapes(cfg)
    per_block = sum(i * o for name, (i, o) in shapes.items() if any(t in name for t in targets))
    return _dims(cfg)[2] * per_block * dtype_bytes


def trainable_bytes(cfg: dict, trainable: str | list, weights: int, lora: dict | None = None) -> int:
    """Bytes of the trainable tensors: every weight (full), fp32 LoRA factors on the targets of
    every layer (q/v by default), the last K blocks (topK), else a quarter of the weights."""
    layers = _dims(cfg)[2]
    if trainable == "full":
        return weights
    if trainable == "lora":
        rank = int((lora or {}).get("rank", 8))
        shapes = _linear_shapes(cfg)
        targets = (lora or {}).get("targets", ["q_proj", "v_proj"])
        return layers * sum(rank * (i + o) * 4 for name, (i, o) in shapes.items() if any(t in name for t in targets))
    if isinstance(trainable, str) and trainable.startswith("top") and trainable[3:].isdigit():
        return weights * int(trainable[3:]) // max(layers, 1)
    return weights // 4


def estimate(
    cfg: dict,
    *,
    precision: str = "fp32",
    trainable: str | list = "full",
    batch_size: int = 16,
    max_length: int = 128,
    method: str = "mezo",
    eval_batch: int | None = None,
    device: str = "cpu",
    runtime_overhead: int | None = None,
    task_type: str = "classification",
    lora: dict | None = None,
    checkpointing: bool = False,
    dizo_layers: list[str] | None = None,
    anchor_in_memory: bool = False,
) -> Footprint:
    """Steady footprint of a job plus the extra each heavy phase asks a lease for: the same formulas
    the worker sizes its leases with (edgezo/trainer.py calls the functions above)."""
    nbytes = DTYPE_BYTES.get(precision, 4)
    params = count_params(cfg)
    weights = params * nbytes
    acts = forward_activations(cfg, batch_size, max_length, nbytes, task_type)
    runtime = RUNTIME_OVERHEAD.get(device, RUNTIME_OVERHEAD["cpu"]) if runtime_overhead is None else runtime_overhead
    train = trainable_bytes(cfg, trainable, weights, lora)
    # ZO keeps no gradients or optimiser state. DiZO streams the pre-trained anchor of its projected
    # layers from the model's safetensors one layer at a time; a GGUF model's anchor is a host copy.
    extra = linear_bytes(cfg, dizo_layers or ["q_proj", "v_proj"], nbytes) if method == "dizo" and anchor_in_memory else 0
    if method == "hizoo":  # H, one fp32 value per trainable element (edgezo/hizoo.py)
        extra += train * 4 // (4 if trainable == "lora" else nbytes)
    steady = runtime + weights + acts + extra
    heavy = {
        Phase.EVAL: eval_extra(cfg, eval_batch or batch_size, max_length, nbytes),
        Phase.PROJECTION: projection_extra(cfg, batch_size, max_length, nbytes, checkpointing),
    }  # export writes from the loaded weights: nothing over the steady state (measured, bench/estimate.py)
    if method == "fo":  # the run holds it as one `fo_step` lease
        heavy[Phase.FO_STEP] = fo_extra(cfg, batch_size, max_length, nbytes, train)
    return Footprint(params, weights, acts, runtime, steady, heavy)


def refine(estimate_bytes: int, measured_bytes: int | None) -> int:
    """After the first measured step the measurement is the truth (the estimate is only a prior)."""
    return int(measured_bytes) if measured_bytes else int(estimate_bytes)


def fmt_bytes(n: float | None, digits: int = 1) -> str:
    """1.2 GiB, 350.0 MiB, 12.0 KiB, 512 B (binary units; "-" for None): the one byte formatter,
    for `edgezo status` (1 digit) and reports (2 digits)."""
    if n is None:
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{sign}{n / scale:.{digits}f} {unit}"
    return f"{sign}{int(n)} B"
