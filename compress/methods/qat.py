"""Weight quantization: QAT with KD (``qat``) and round-to-nearest PTQ (``quantize``), exported in
the compressed-tensors format (``pack-quantized``) that transformers and vLLM load.

    stages:
      - kind: qat                      # a distill stage whose student runs fake-quantized linears
        weights: {bits: 4, group_size: 64, symmetric: true}
        loss: forward_kl               # KD from the unquantized teacher (any distill option);
                                       # kd_weight: 0 + ce_weight: 1 is plain CE QAT
      - kind: quantize                 # or: PTQ, one shot, no training
        weights: {bits: 8, group_size: null}

The transform swaps every targeted ``nn.Linear`` (``targets`` name suffixes, minus ``ignore``) for
a ``QuantLinear``: float master weights, forward through ``compress.quant.fake_quant`` (the
straight-through estimator), scales from the weights at every step. The export packs each into
``weight_packed`` (int32) + ``weight_scale`` (+ ``weight_zero_point``) + ``weight_shape`` and
writes the matching ``quantization_config``; its dequantized weights equal the fake-quant
forward's (a test decompresses the export with the compressed-tensors library itself).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from compress.config import Strict
from compress.errors import CompressError
from compress.methods.distill import Distill, DistillStage
from compress.modelio import register_module
from compress.models import head_dim
from compress.quant import (IntSpec, dequantize, fake_quant, gguf_dequantize, gguf_fake_quant, gguf_quantize,
                            pack_int32, quantize)
from compress.stages import StageConfig, StageMethod, register

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class WeightQuant(Strict):
    # int: integer groups (bits, group_size, symmetric below); gguf_q8_0 / gguf_q4_0: llama.cpp's
    # blocks of 32 with an fp16 scale, rounded exactly as ggml does (bits/group_size do not apply)
    format: Literal["int", "gguf_q8_0", "gguf_q4_0"] = "int"
    bits: Literal[4, 8] = 4
    group_size: int | None = Field(64, ge=8)  # None: one scale per output channel
    symmetric: bool = True
    targets: list[str] = Field(default_factory=lambda: list(PROJECTIONS), min_length=1)  # module name suffixes
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    # compressed-tensors: packed integers + scales (transformers, vLLM); dequantized: plain float
    # weights; gguf: final/model-<type>.gguf for llama.cpp beside a dequantized HF folder
    export: Literal["compressed-tensors", "dequantized", "gguf"] = "compressed-tensors"

    @model_validator(mode="after")
    def _exportable(self) -> "WeightQuant":
        gguf = self.format != "int"
        if gguf and "export" not in self.model_fields_set:
            object.__setattr__(self, "export", "gguf")
        if gguf != (self.export == "gguf"):
            raise ValueError("a GGUF file holds GGUF blocks: use format gguf_q8_0 / gguf_q4_0 with export: gguf")
        if not self.symmetric and self.export == "compressed-tensors":
            raise ValueError("asymmetric weights cannot be exported as compressed-tensors here (transformers 5.24 "
                             "allocates an unpacked zero point that compressed-tensors 0.20 then unpacks): use "
                             "symmetric: true, or export: dequantized")
        return self

    def spec(self) -> IntSpec:
        return IntSpec(self.bits, 32 if self.format != "int" else self.group_size, self.symmetric)


@register_module
class QuantLinear(nn.Linear):
    """A linear whose forward uses its weight quantized and dequantized (STE in the backward)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None,
                 symmetric: bool, packed_export: bool = True, fmt: str = "int"):
        super().__init__(in_features, out_features, bias=bias)
        self.qspec = IntSpec(bits, group_size, symmetric)
        self.qspec.groups(in_features)
        self.packed_export, self.fmt = packed_export and fmt == "int", fmt

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: IntSpec, packed_export: bool = True, fmt: str = "int") -> "QuantLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, spec.bits, spec.group_size, spec.symmetric,
                packed_export, fmt)
        m.to(lin.weight.device, lin.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant(self.weight, self.qspec) if self.fmt == "int" else gguf_fake_quant(self.weight, self.fmt[5:])
        return F.linear(x, w, self.bias)

    def spec(self) -> dict:
        s = self.qspec
        return {"in": self.in_features, "out": self.out_features, "bias": self.bias is not None,
                "bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric, "packed_export": self.packed_export,
                "fmt": self.fmt}

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantLinear":
        return cls(spec["in"], spec["out"], spec["bias"], spec["bits"], spec["group_size"], spec["symmetric"],
                   spec["packed_export"], spec.get("fmt", "int"))

    def materialize(self) -> nn.Linear:
        """A plain linear holding the dequantized weight (what the fake-quant forward computes)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            if self.fmt == "int":
                lin.weight.copy_(dequantize(*quantize(self.weight, self.qspec), self.qspec, self.weight.dtype))
            else:
                lin.weight.copy_(gguf_dequantize(*gguf_quantize(self.weight, self.fmt[5:]), self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # --- the compressed-tensors export (compress.export) ---
    def export_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """compressed-tensors' pack-quantized tensors of this module; None: export materialized."""
        if not self.packed_export:
            return None
        q, scale, zero = quantize(self.weight, self.qspec)
        out = {"weight_packed": pack_int32(q, self.qspec.bits), "weight_scale": scale.to(dtype),
               "weight_shape": torch.tensor([self.out_features, self.in_features])}
        if not self.qspec.symmetric:  # unpacked: the shape transformers' loader allocates for it
            out["weight_zero_point"] = zero.to(torch.int8)
        if self.bias is not None:
            out["bias"] = self.bias.detach().to(dtype)
        return out

    @staticmethod
    def export_config(modules: dict[str, "QuantLinear"], ignore: list[str]) -> dict:
        specs = {(m.qspec.bits, m.qspec.group_size, m.qspec.symmetric) for m in modules.values()}
        if len(specs) != 1:
            raise CompressError(f"the model mixes quantization settings {sorted(specs, key=str)}; export one setting "
                                "(one qat or quantize stage)")
        bits, group, sym = specs.pop()
        weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                   "strategy": "group" if group else "channel", "group_size": group}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": ignore, "kv_cache_scheme": None}


def quantize_linears(model: nn.Module, cfg: WeightQuant) -> dict[str, QuantLinear]:
    """Swap the targeted linears for ``QuantLinear`` (in place); returns them by name."""
    spec, swapped = cfg.spec(), {}
    for name, m in list(model.named_modules()):
        if type(m) is not nn.Linear or not any(name.endswith(t) for t in cfg.targets):
            continue
        if any(name == i or name.endswith("." + i) for i in cfg.ignore):
            continue
        spec.groups(m.in_features, name)
        swapped[name] = QuantLinear.from_linear(m, spec, cfg.export == "compressed-tensors", cfg.format)
        model.set_submodule(name, swapped[name])
    unmatched = [t for t in cfg.targets if not any(n.endswith(t) for n in swapped)]
    if unmatched:
        raise CompressError(f"quantization targets {unmatched} match no linear of the model; fix `weights.targets` "
                            f"(e.g. {', '.join(PROJECTIONS[:3])})")
    return swapped


def check_fit(cfg: WeightQuant, model_cfg) -> None:
    """Group sizes against the model's input widths, before any weights load (Llama-like names)."""
    if model_cfg is None:
        return
    hd = head_dim(model_cfg)
    inputs = {"q_proj": model_cfg.hidden_size, "k_proj": model_cfg.hidden_size, "v_proj": model_cfg.hidden_size,
              "gate_proj": model_cfg.hidden_size, "up_proj": model_cfg.hidden_size,
              "o_proj": model_cfg.num_attention_heads * hd, "down_proj": model_cfg.intermediate_size}
    unknown = [t for t in cfg.targets if t not in inputs and t != "lm_head"]
    if unknown:
        raise CompressError(f"quantization targets {unknown} match no linear of a {model_cfg.model_type} model; "
                            f"use some of {', '.join(PROJECTIONS)} (or lm_head)")
    for target in cfg.targets:
        if target in inputs:
            cfg.spec().groups(inputs[target], target)
        elif target == "lm_head" and "lm_head" not in cfg.ignore:
            cfg.spec().groups(model_cfg.hidden_size, target)


class QatStage(DistillStage):
    """Quantization-aware training: fake-quantized linears trained by KD (or CE) on the one loop."""

    kind: Literal["qat"] = "qat"
    weights: WeightQuant = Field(default_factory=WeightQuant)


def gguf_source(cfg: WeightQuant, recipe) -> str | None:
    """The GGUF file whose tokenizer metadata a GGUF export copies (the teacher's)."""
    if cfg.export != "gguf":
        return None
    from compress.models import resolve_source

    src = resolve_source(recipe.teacher.source)
    if src.gguf_file is None:
        raise CompressError("export: gguf copies the tokenizer from the teacher's GGUF file, but the teacher is "
                            f"{recipe.teacher.source!r}; use a .gguf teacher or another export")
    return str(src)


class QuantizesWeights:
    """What ``qat`` and ``quantize`` share: the checks, the swap to ``QuantLinear``, the GGUF file."""

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        super().check(cfg, recipe, configs)  # the training method's own checks, where there is one
        check_fit(cfg.weights, configs.get("student"))
        gguf_source(cfg.weights, recipe)

    def transform(self, model: nn.Module) -> nn.Module:
        quantize_linears(model, self.cfg.weights)  # RTN is this swap: its fake-quant forward is the quantized model
        return model

    def export(self, model: nn.Module, final_dir) -> None:
        import copy
        from pathlib import Path

        from compress.gguf_export import write_gguf
        from compress.modelio import materialize

        cfg = self.cfg.weights
        if cfg.export == "gguf":
            kind = cfg.format[5:]
            write_gguf(materialize(copy.deepcopy(model)).float(), Path(final_dir) / f"model-{kind}.gguf", kind,
                       gguf_source(cfg, self.ctx.recipe))


@register(QatStage)
class Qat(QuantizesWeights, Distill):
    """KD (or CE) training of the fake-quantized student on the one loop."""


class QuantizeStage(StageConfig):
    """Post-training quantization, round to nearest (the PTQ baseline); no training."""

    kind: Literal["quantize"] = "quantize"
    weights: WeightQuant = Field(default_factory=WeightQuant)
    method: Literal["rtn"] = "rtn"
    max_steps: None = None


@register(QuantizeStage)
class Quantize(QuantizesWeights, StageMethod):
    trains = False
