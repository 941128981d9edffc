"""LoRA adapters (peft) as the trainable set: ZO perturbs and updates only lora_A/lora_B.

`trainable: lora` wraps the loaded base (fp32/fp16/bf16, or an LLM.int8 base from bitsandbytes)
with peft's LoRA layers on the spec's `lora.targets`. The Perturber's hooks then sit on the
adapters' own Linear modules (`...q_proj.lora_A.default`), so a perturbed forward sees
A + s·ε·z and B + s·ε·z while the base weights are never touched, int8 codes included.

The adapter's initial value must be a function of the job alone: replay and resume rebuild the
engine from the base model and apply the seed-log to that initial adapter. lora_A's random init is
therefore drawn under a CPU generator seeded from the job seed (the global RNG is left as it was);
lora_B starts at zero, so the adapted model starts out equal to the base.
The export is a standard peft adapter directory (`adapter_config.json` +
`adapter_model.safetensors`), loadable with `PeftModel.from_pretrained(base, dir)`.
"""

from __future__ import annotations

import torch
from torch import nn

from edgezo.noise import mix

ADAPTER_PATTERNS = ("lora_A.", "lora_B.")  # substrings of the adapter tensors' names (collect_params)
_INIT_STREAM = 0x10EA  # keeps the init seed apart from the step seeds drawn from the same job seed


class LoraError(ValueError):
    pass


def init_seed(job_seed: int) -> int:
    return mix(job_seed, _INIT_STREAM)


def lora_config(cfg: dict):
    from peft import LoraConfig

    return LoraConfig(r=int(cfg["rank"]), lora_alpha=cfg["alpha"], lora_dropout=float(cfg["dropout"]),
                      target_modules=list(cfg["targets"]), bias="none", task_type="CAUSAL_LM")


def wrap(model: nn.Module, cfg: dict, job_seed: int) -> nn.Module:
    """The peft model around `model` (modified in place), adapters initialised from the job seed,
    frozen for autograd (ZO never calls backward; DiZO-FO differentiates its ratios only)."""
    import warnings

    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(init_seed(job_seed))
        try:
            peft_model = get_peft_model(model, lora_config(cfg))
        except ValueError as e:
            raise LoraError(f"lora.targets: {cfg['targets']} match no module peft can adapt: {e}") from None
    peft_model.eval()
    peft_model.requires_grad_(False)
    return peft_model


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_adapter(model: nn.Module, out) -> None:
    """A standard peft adapter directory (only the adapter tensors, not the base)."""
    model.save_pretrained(str(out), safe_serialization=True)
