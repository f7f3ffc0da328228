"""Low-rank adapters (LoRA, Hu et al. 2021) on any training stage, merged back before the result is saved.

    stages:
      - kind: distill
        lora: {r: 16, alpha: 32}       # train adapters only; the base weights stay frozen

The spine adds the adapters (``peft``) before the stage's ``wrap`` and folds them into the base
weights (W + alpha/r * B @ A) when it detaches the trained student, from the optimizer's fp32
master copies of A and B; the stage result and the export are plain models of the same shape.
For users with little compute: the optimizer holds state for the adapters only.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from compress.config import Strict

ADAPTER = "default"


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], min_length=1)


def add_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze ``model`` and inject trainable adapters into the ``cfg.targets`` linears (in place)."""
    from peft import LoraConfig as PeftLora
    from peft import inject_adapter_in_model

    for p in model.parameters():
        p.requires_grad_(False)
    peft_cfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.targets)
    return inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})}


def merged_state(state: dict, model: nn.Module) -> dict:
    """``state`` (of ``model``, adapters injected) with every adapter folded into its base weight,
    under the stock names (``...q_proj.weight``)."""
    out = dict(state)
    for name, m in lora_modules(model).items():
        base = out.pop(f"{name}.base_layer.weight")
        a, b = out.pop(f"{name}.lora_A.{ADAPTER}.weight"), out.pop(f"{name}.lora_B.{ADAPTER}.weight")
        out[f"{name}.weight"] = base + m.scaling[ADAPTER] * (b.to(base.dtype) @ a.to(base.dtype))
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    assert not [k for k in out if ".lora_" in k or ".base_layer." in k], "unmerged adapter tensors left"
    return out
