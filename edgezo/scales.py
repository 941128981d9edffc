"""The int8 layers' per-row scales as the trainable set (QZO-style: `trainable: scales`).

An LLM.int8 weight is codes (int8, one row per output feature) times a per-row scale
(absmax/127, kept by bitsandbytes as `state.SCB`, fp32). The codes cannot take a small Gaussian
step, but the scales can: perturbing and updating only them trains a quantised model without ever
de-quantising it, with one fp32 number per output row as the whole optimiser state.

bitsandbytes reads the scales from `module.state.SCB` inside its forward, so the Perturber's usual
swap of `module._parameters[...]` would not reach them. `expose` registers each layer's scales as a
parameter named `weight_scale` (same storage as `state.SCB`, so in-place updates are what the matmul
reads) and wraps the layer's forward to point `state.SCB` at whatever `weight_scale` holds for that
forward: the real scales, a perturbed copy, or DiZO's projected ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

SCALE_ATTR = "weight_scale"
SCALE_PATTERNS = [f".{SCALE_ATTR}"]  # collect_params picks exactly these tensors


class ScalesError(ValueError):
    pass


def int8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    import bitsandbytes as bnb

    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]


def expose(model: nn.Module) -> int:
    """Register every int8 layer's row scales as `weight_scale`; returns how many layers."""
    layers = int8_layers(model)
    if not layers:
        raise ScalesError("trainable: scales needs int8 layers (precision: int8); the model has none")
    for _, layer in layers:
        if layer.weight.CB is not None:  # bitsandbytes moves codes and scales into layer.state lazily
            layer.init_8bit_state()
        if layer.state.SCB is None:
            raise ScalesError(f"trainable: scales: {type(layer).__name__} holds no row scales (SCB)")
        home = nn.Parameter(layer.state.SCB, requires_grad=False)  # shares storage with state.SCB
        layer.register_parameter(SCALE_ATTR, home)
        layer.state.SCB = home
        layer.forward = _scaled_forward(layer, home, layer.forward)
    return len(layers)


def _scaled_forward(layer: nn.Module, home: nn.Parameter, inner):
    def forward(x):
        layer.state.SCB = layer._parameters[SCALE_ATTR]  # the scales this forward should see
        try:
            return inner(x)
        finally:
            layer.state.SCB = home

    return forward


@contextmanager
def hidden(model: nn.Module) -> Iterator[None]:
    """Without the extra `weight_scale` parameters, so save_pretrained writes a plain bitsandbytes
    int8 checkpoint (its own `SCB` entries carry the trained scales)."""
    taken = [(layer, layer._parameters.pop(SCALE_ATTR)) for _, layer in int8_layers(model)
             if SCALE_ATTR in layer._parameters]
    try:
        yield
    finally:
        for layer, p in taken:
            layer._parameters[SCALE_ATTR] = p


def save_int8(model: nn.Module, out: Path) -> None:
    """An int8 model directory that `from_pretrained(out)` loads back with the trained scales."""
    with hidden(model):
        model.save_pretrained(str(out))
