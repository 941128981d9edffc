"""Load a causal LM from a local HF directory or a GGUF file, in the spec's precision and device."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from edgezo.protocol import EdgezoError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelError(EdgezoError, RuntimeError):
    kind, label = "model", "model could not be loaded"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda requested but no CUDA device is available")
    return torch.device(name)


def model_path(value: str) -> Path:
    if value == "default":
        from edgezo import assets

        return assets.resolve_model("default")
    p = Path(value).expanduser()
    if not p.exists():
        raise ModelError(f"model: no such local model directory or .gguf file: {p}")
    return p


def weights_hash(path: Path) -> str:
    """sha256 over the weight files, pinning the base model in the seed-log header."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")
    )
    if not files:
        raise ModelError(f"model: no weight files (*.safetensors, *.bin, *.gguf) in {path}")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def load(value: str, precision: str, device: torch.device):
    """(model, tokenizer, path). The model is frozen (no autograd): ZO never calls backward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress goes to stderr; one bar is enough

    path = model_path(value)
    if precision == "int8":
        kwargs: dict = int8_kwargs(device)
        if path.is_file():
            raise ModelError(f"precision: int8 needs a Hugging Face safetensors directory, not {path}")
    elif precision not in DTYPES:
        raise ModelError(f"precision: {precision} is not supported by this loader")
    else:
        kwargs = {"dtype": DTYPES[precision]}
    src = path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model: {path} is a file but not a .gguf file")
        src, kwargs["gguf_file"] = path.parent, path.name
    try:
        tok = AutoTokenizer.from_pretrained(src, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
        model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"model: could not load {path}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if path.is_file():
        as_plain_model(model, path)
    if precision != "int8":  # bitsandbytes models are placed by device_map and refuse .to()
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tok, path


def as_plain_model(model: nn.Module, path: Path) -> None:
    """A GGUF-loaded model as an ordinary float model. transformers dequantises every GGUF weight on
    load (it keeps GGUF blocks only with its optional GPU kernels) yet still marks the model as
    quantised, and save_pretrained then refuses it, so a job on a .gguf model could not export."""
    packed = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if packed:
        raise ModelError(f"model: transformers kept {path}'s weights in GGUF blocks ({packed[0]}, ...), which "
                         "cannot be trained; uninstall the `kernels` package or convert the GGUF first")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def int8_kwargs(device: torch.device) -> dict:
    """from_pretrained arguments for an LLM.int8 base (bitsandbytes) on `device`, CPU or CUDA.

    The layers bitsandbytes leaves unquantised (embeddings, norms, lm_head) are fp16, as in LLM.int8
    (its matmul casts its inputs to fp16 anyway); LoRA adapters on top are fp32 (peft upcasts them)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelError(f"precision: int8 needs bitsandbytes ({e}); pip install bitsandbytes, "
                         "or build it from source on Jetson (see README)") from None
    import logging

    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_quiet_cast)  # idempotent
    place = (device.index or 0) if device.type == "cuda" else "cpu"
    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": place},
            "dtype": torch.float16}


def _quiet_cast(record) -> bool:
    """bitsandbytes logs 'inputs will be cast ... to float16' on every int8 matmul; that is by design."""
    return "will be cast" not in record.getMessage()


def trainable_patterns(trainable) -> list[str] | None:
    if trainable == "lora":
        from edgezo.lora import ADAPTER_PATTERNS

        return list(ADAPTER_PATTERNS)
    if trainable == "scales":
        from edgezo.scales import SCALE_PATTERNS

        return list(SCALE_PATTERNS)
    return None if trainable == "full" else list(trainable)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the LoRA layers are injected into it in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body that returns final hidden states (final norm included), no lm_head."""
    model = unwrap(model)
    return getattr(model, model.base_model_prefix)


def head_weight(model: nn.Module) -> torch.Tensor:
    head = unwrap(model).get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ModelError("model: needs a bias-free output embedding (lm_head)")
    return head.weight
