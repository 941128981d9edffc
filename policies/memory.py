"""How much memory a job needs: an estimate from the model config, before anything is loaded.

Pure arithmetic on a config mapping (the HF `config.json` fields). The daemon uses the steady
figure for admission; the worker's first measured step replaces it (see `refine`).
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
RUNTIME_OVERHEAD = {"cpu": 384 * MiB, "cuda": 512 * MiB}


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


def forward_activations(cfg: dict, batch: int, seq: int, dtype_bytes: int) -> int:
    """Peak live activations of one no-grad forward: one layer's working set plus fp32 logits."""
    h = int(cfg.get("hidden_size", 768))
    inter = int(cfg.get("intermediate_size", 4 * h))
    heads = int(cfg.get("num_attention_heads", 12))
    v = int(cfg.get("vocab_size", 32000))
    tokens = batch * seq
    layer = tokens * (4 * h + 3 * inter) * dtype_bytes + batch * heads * seq * seq * dtype_bytes
    logits = tokens * v * 4
    return layer + logits


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
) -> Footprint:
    """Steady footprint of a ZO job plus the extra each heavy phase needs."""
    nbytes = DTYPE_BYTES.get(precision, 4)
    params = count_params(cfg)
    weights = params * nbytes
    acts = forward_activations(cfg, batch_size, max_length, nbytes)
    runtime = RUNTIME_OVERHEAD.get(device, RUNTIME_OVERHEAD["cpu"]) if runtime_overhead is None else runtime_overhead
    # ZO keeps no gradients or optimiser state; DiZO keeps the pre-trained anchor of the projected layers.
    trainable_frac = 1.0 if trainable == "full" else 0.25
    extra = int(weights * trainable_frac) if method == "dizo" else 0
    steady = runtime + weights + acts + extra
    eval_acts = forward_activations(cfg, eval_batch or batch_size, max_length, nbytes)
    heavy = {
        Phase.EVAL: max(eval_acts - acts, 0) + acts // 2,
        # first-order projection learning: activations kept for backward (~ layers x forward) + Adam on factors
        Phase.PROJECTION: acts * max(int(cfg.get("num_hidden_layers", 12)) // 2, 1),
        Phase.EXPORT: weights,
    }
    if method == "fo":  # backprop with checkpointing: every layer's input kept, one layer recomputed, then
        # gradients and AdamW's two moments for the trainable set; the run holds it as one `fo_step` lease
        n_layers = int(cfg.get("num_hidden_layers", 12))
        h = int(cfg.get("hidden_size", 768))
        trainable_bytes = int(weights * trainable_frac) if trainable != "lora" else int(weights * 0.01)
        heavy[Phase.FO_STEP] = n_layers * batch_size * max_length * h * nbytes + 2 * acts + 3 * trainable_bytes
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
