"""How much disk a job will take, and whether it fits. Pure: tensor shapes and byte counts come in.

A job directory ends up holding its output (the trained model in the precision it trained in, a
LoRA adapter, or an int8 checkpoint), its snapshots (the trainable tensors, + AdamW's two moments
for `method: fo`; the newest `snapshot.keep` survive, and one more exists while it is written), and
its seed-log and events (a few hundred bytes a step). The trainable set is read off tensor names
the way the trainer picks it: topK is the last K `layers.N` blocks plus what sits outside the blocks
but is not an embedding or the head (the final norm); a pattern list matches by substring.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import fmt_bytes

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
Shapes = list[tuple[str, tuple[int, ...]]]

STEP_JOURNAL_BYTES = 400  # one step's seed-log frame and events line, besides its per-direction numbers
JOURNAL_BYTES = 64 * 1024  # the seed-log header (it lists every trainable tensor) and the run's other events
DIRECTION_BYTES = 48  # one direction's seed and scalar in the seed-log (JSON)


@dataclass(frozen=True)
class DiskNeed:
    output: int
    snapshot: int  # one snapshot
    snapshots: int  # at most on disk at once (keep + the one being written); 0: the job never takes one
    journal: int  # seed-log + events

    @property
    def total(self) -> int:
        return self.output + self.snapshot * self.snapshots + self.journal

    def describe(self) -> str:
        parts = [f"output {fmt_bytes(self.output)}"]
        if self.snapshots:
            parts.append(f"{self.snapshots} snapshots of {fmt_bytes(self.snapshot)}")
        parts.append(f"seed-log and events {fmt_bytes(self.journal)}")
        return ", ".join(parts)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def block_index(name: str) -> int | None:
    """N of a tensor inside block `layers.N.` (`model.layers.3.mlp.up_proj.weight` -> 3), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-2]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _outside_blocks(name: str) -> bool:
    return block_index(name) is None and "embed" not in name and not name.startswith("lm_head")


def _linear_weights(shapes: Shapes) -> Shapes:
    """The blocks' matrices: what LoRA adapts and LLM.int8 quantises (embeddings and head are not)."""
    return [(n, s) for n, s in shapes if len(s) == 2 and n.endswith(".weight") and block_index(n) is not None]


def trainable_bytes(shapes: Shapes, trainable: str | list[str], precision: str, lora: dict | None = None) -> int:
    """Bytes of the trainable tensors as a snapshot stores them."""
    elem = DTYPE_BYTES.get(precision, 4)
    if trainable == "lora":  # r·(in + out) fp32 numbers per adapted matrix
        lora = lora or {}
        rank, targets = int(lora.get("rank", 8)), list(lora.get("targets", ["q_proj", "v_proj"]))
        return sum(rank * (s[0] + s[1]) * 4 for n, s in _linear_weights(shapes)
                   if any(n[: -len(".weight")].endswith(t) for t in targets))
    if trainable == "scales":  # one fp32 scale per output row of every int8 matrix
        return sum(s[0] * 4 for _, s in _linear_weights(shapes))
    if trainable == "full":
        return sum(numel(s) for _, s in shapes) * elem
    if isinstance(trainable, str) and trainable.startswith("top") and trainable[3:].isdigit():
        blocks = [b for n, _ in shapes if (b := block_index(n)) is not None]
        first = (max(blocks) + 1 if blocks else 0) - int(trainable[3:])
        return sum(numel(s) for n, s in shapes
                   if ((b := block_index(n)) is not None and b >= first) or _outside_blocks(n)) * elem
    patterns = [trainable] if isinstance(trainable, str) else list(trainable)
    return sum(numel(s) for n, s in shapes if any(p in n for p in patterns)) * elem


def output_bytes(shapes: Shapes, trainable: str | list[str], precision: str, lora: dict | None = None,
                 side_files: int = 0) -> int:
    """The exported model: a peft adapter for LoRA, an int8 checkpoint (codes, fp32 row scales, the
    rest fp16) for scales, else every tensor in the training precision; plus config and tokenizer."""
    if trainable == "lora":
        body = trainable_bytes(shapes, "lora", precision, lora)
    elif trainable == "scales":
        linear = {n for n, _ in _linear_weights(shapes)}
        body = sum(numel(s) + s[0] * 4 if n in linear else numel(s) * 2 for n, s in shapes)
    else:
        body = sum(numel(s) for _, s in shapes) * DTYPE_BYTES.get(precision, 4)
    return body + side_files


def llama_shapes(cfg: dict) -> Shapes:
    """Tensor shapes of a decoder-only model from its HF config, for models with no safetensors to
    read (a .gguf file): the same fields `policies.memory.count_params` reads."""
    v = int(cfg.get("vocab_size", 32000))
    h = int(cfg.get("hidden_size", 768))
    inter = int(cfg.get("intermediate_size", 4 * h))
    heads = int(cfg.get("num_attention_heads", 12))
    kv = int(cfg.get("num_key_value_heads", heads))
    hd = int(cfg.get("head_dim") or h // max(heads, 1))
    out: Shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(int(cfg.get("num_hidden_layers", 12))):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (heads * hd, h)), (p + "self_attn.k_proj.weight", (kv * hd, h)),
                (p + "self_attn.v_proj.weight", (kv * hd, h)), (p + "self_attn.o_proj.weight", (h, heads * hd)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", True):
        out.append(("lm_head.weight", (v, h)))
    return out


def need(shapes: Shapes, *, trainable: str | list[str], precision: str, method: str, steps: int,
         perturbations: int = 1, lora: dict | None = None, snapshot_every: int | None = None, keep: int = 1,
         side_files: int = 0) -> DiskNeed:
    """What a job will hold at most: its output, `keep` snapshots + the one being written (none when
    `snapshot_every` is 0), its seed-log and events. Whether a cost-ruled job snapshots at all is
    known only once its updates are timed, so it is counted as if it did."""
    snap = trainable_bytes(shapes, trainable, precision, lora)
    if method == "fo":  # AdamW's two moments, each the size of the trainable tensors
        snap *= 3
    per_step = STEP_JOURNAL_BYTES + (0 if method == "fo" else DIRECTION_BYTES * max(1, perturbations))
    return DiskNeed(output=output_bytes(shapes, trainable, precision, lora, side_files), snapshot=snap,
                    snapshots=0 if snapshot_every == 0 else keep + 1, journal=JOURNAL_BYTES + steps * per_step)


def disk_wait(need_bytes: int, free_bytes: int, where: str, detail: str, promised: int = 0) -> str | None:
    """Why a job cannot start for lack of disk (None when it fits): the numbers, and where."""
    room = free_bytes - promised
    if need_bytes <= room:
        return None
    why = f"needs {fmt_bytes(need_bytes)} of disk ({detail}), {fmt_bytes(max(room, 0))} free on {where}"
    if promised:
        why += f" ({fmt_bytes(free_bytes)} free, {fmt_bytes(promised)} of it still to be written by running jobs)"
    return why
