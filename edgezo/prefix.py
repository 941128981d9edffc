"""Frozen-prefix sharing: compute the layers below the first trainable one once per step.

When only the top layers of a decoder are trainable (e.g. `trainable: top2`), every perturbed
forward of a step recomputes the same frozen bottom of the network on the same batch. Here the
bottom runs once, unperturbed (which also gives the step's unperturbed loss), its output is kept,
and each perturbed forward runs only from the first trainable layer up: the frozen layers answer
with the kept output instead of computing. Nothing about the result changes — the suffix sees
bit-identical inputs — so a step costs one full forward plus N short ones instead of N full ones.

When no block trains at all (`trainable: top0`, the final norm), the step's input to the trainable
part is each example's last-block output, and the classification head reads it at one position: the
last real token. `FeatureCache` keeps that one vector per training example, so an example that comes
round again (a later epoch, `task.train_size`) costs no forward at all. A recalled vector was computed
in the first batch its example was in; it equals a fresh forward's up to the rounding of a different
batch shape. The run stays deterministic, and a resume equals an uninterrupted run bit for bit: the
frozen blocks do not change, so a resumed job recomputes the batches of the steps it skips, in order,
and keeps exactly the vectors the uninterrupted run kept.

Sharing is only used when it is provably exact: no trainable tensor in an embedding table (a tied
lm_head is one) or in a layer below the cut. The trainer checks it once on the first batch
anyway (a shared and a full perturbed forward must give the same loss, bit for bit) and turns
sharing off with a warning otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from edgezo.noise import ZOParam


def decoder_layers(decoder: nn.Module) -> nn.ModuleList | None:
    """The list of transformer blocks the decoder loops over (Llama/Qwen `layers`, OPT `decoder.layers`,
    GPT-2 `h`): the longest ModuleList among its modules."""
    best: nn.ModuleList | None = None
    for m in decoder.modules():
        if isinstance(m, nn.ModuleList) and len(m) > (len(best) if best is not None else 0):
            best = m
    return best


def first_trainable_layer(decoder: nn.Module, params: list[ZOParam]) -> int:
    """Index of the lowest block holding a trainable tensor; 0 when sharing is impossible (a trainable
    embedding, or no block list), len(layers) when only tensors above the blocks train (final norm)."""
    layers = decoder_layers(decoder)
    if layers is None:
        return 0
    where: dict[int, int] = {}
    for i, block in enumerate(layers):
        for t in block.parameters():
            where.setdefault(id(t), i)
    cut = len(layers)
    for p in params:
        if any(isinstance(m, nn.Embedding) for m, _ in p.owners):
            return 0
        i = where.get(id(p.param))
        if i is not None:
            cut = min(cut, i)
    return cut


class PrefixCache:
    """Keeps the output of the frozen blocks [0, cut) for one batch; replays it for perturbed forwards."""

    def __init__(self, decoder: nn.Module, cut: int):
        layers = decoder_layers(decoder)
        if layers is None or not 0 < cut:
            raise ValueError("no frozen prefix to share")
        self.frozen = list(layers[:cut])
        self.cut, self.blocks = cut, len(layers)
        # every block frozen: what runs on the kept output is the decoder's final norm alone, called
        # directly (the decoder's own last line on the same input: the same bits, none of its overhead)
        norm = getattr(decoder, "norm", None)
        self.top: nn.Module | None = norm if cut == len(layers) and isinstance(norm, nn.Module) else None
        self.key: torch.Tensor | None = None  # the input ids the kept output belongs to
        self.kept = None

    def clear(self) -> None:
        self.key, self.kept = None, None

    def holds(self, ids: torch.Tensor) -> bool:
        return self.key is not None and self.key.shape == ids.shape and bool(torch.equal(self.key, ids))

    @contextmanager
    def capturing(self, ids: torch.Tensor) -> Iterator[None]:
        """The forward inside runs in full; the last frozen block's output is kept for `ids`."""
        def grab(module, args, output):
            self.kept = output

        handle = self.frozen[-1].register_forward_hook(grab)
        try:
            yield
        finally:
            handle.remove()
        self.key = ids.detach().clone()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """The forward inside skips the frozen blocks: each answers with the kept output (only the last
        one's answer reaches the first trainable block)."""
        kept = self.kept

        def answer(*args, **kwargs):
            return kept

        for block in self.frozen:
            block.forward = answer  # instance attribute: nn.Module.__call__ looks it up first
        try:
            yield
        finally:
            for block in self.frozen:
                del block.forward


class FeatureCache:
    """Each training example's last-real-token output of the last block (`trainable: top0` only):
    what the final norm and the head need to score it. One [capacity, hidden] tensor, filled row by
    row (thousands of small tensors fragmented the heap: RSS grew ~190 KB per sentence); 576 floats a
    sentence for SmolLM2-135M, 20 MB for the whole Rotten Tomatoes train split."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.row: dict[int, int] = {}  # id(example) -> its row
        self.table: torch.Tensor | None = None  # [capacity, hidden], allocated at the first example

    def bytes(self) -> int:
        return self.table.numel() * self.table.element_size() if self.table is not None else 0

    def has(self, batch: list) -> bool:
        return all(id(e) in self.row for e in batch)

    def remember(self, batch: list, kept: torch.Tensor, last: torch.Tensor) -> None:
        """Keep the examples not kept yet: each example's vector is the one from the first batch it
        was in, so a resumed run that recomputes those batches (`Task.warm_features`) keeps the same bits."""
        if self.table is None:
            self.table = torch.empty((self.capacity, kept.shape[-1]), dtype=kept.dtype, device=kept.device)
        for b, e in enumerate(batch):
            if id(e) not in self.row and len(self.row) < self.capacity:
                self.row[id(e)] = len(self.row)
                self.table[self.row[id(e)]] = kept[b, int(last[b])]

    def recall(self, batch: list, shape: torch.Size, last: torch.Tensor) -> torch.Tensor:
        """A last-block output for the padded batch: each example's kept vector at its last real token,
        zeros elsewhere (the norm is per token and the head reads only that position)."""
        assert self.table is not None
        out = torch.zeros(shape, dtype=self.table.dtype, device=self.table.device)
        rows = torch.tensor([self.row[id(e)] for e in batch], device=self.table.device)
        out[torch.arange(len(batch), device=out.device), last] = self.table[rows]
        return out


def top_patterns(model: nn.Module, decoder: nn.Module, k: int) -> list[str]:
    """`trainable: topK`: the names of every tensor in the last K blocks and of the tensors above the
    blocks (the final norm), never an embedding table or a (tied) lm_head."""
    layers = decoder_layers(decoder)
    if layers is None:
        raise ValueError("trainable: topK needs a decoder with a list of blocks")
    if k > len(layers):
        raise ValueError(f"trainable: top{k} asks for more blocks than the model has ({len(layers)})")
    top = {id(t) for block in layers[len(layers) - k:] for t in block.parameters()}
    inside = {id(t) for block in layers for t in block.parameters()}
    embeddings = {id(t) for m in model.modules() if isinstance(m, nn.Embedding) for t in m.parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {id(t) for t in head.parameters()} if head is not None else set()
    decoder_ids = {id(t) for t in decoder.parameters()}
    names = []
    for name, t in model.named_parameters():
        if id(t) in top or (id(t) in decoder_ids and id(t) not in inside and id(t) not in embeddings
                            and id(t) not in heads):
            names.append(name)
    return names
