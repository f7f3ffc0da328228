"""Quantization: QAT with KD (``qat``) and PTQ (``quantize``: round to nearest, or GPTQ), in the
integer, float (FP8, NVFP4, MXFP4) and GGUF formats, with optional per-token activation (W8A8)
and KV-cache quantization, exported as compressed-tensors (transformers, vLLM) or GGUF (llama.cpp).

    stages:
      - kind: qat                      # a distill stage whose student runs fake-quantized linears
        weights: {bits: 4, group_size: 64}             # or {format: nvfp4}, {format: fp8, activations: fp8}
        kv_cache: {format: fp8, per_head: true}        # optional: K/V rounded as the cache stores them
        loss: forward_kl               # KD from the unquantized teacher (any distill option);
                                       # kd_weight: 0 + ce_weight: 1 is plain CE QAT
      - kind: quantize                 # or: PTQ, one shot, no training
        weights: {bits: 4, group_size: 32}
        method: gptq                   # rtn (default) | gptq (compress.gptq, on calibration text)

A ``qat`` stage takes ``method: gptq`` too: training then starts from GPTQ's weights, with GPTQ's
scales held fixed (the weights move on that grid), or trained from there with ``learn_scales``,
instead of from round to nearest. Either start can be followed by ``blockwise: {epochs: 2, lr: 1e-4}``
(``compress.blockwise``, EfficientQAT's Block-AP): each decoder layer trained, in turn, to give the
unquantized model's output at its depth on calibration text; on a ``quantize`` stage that is the
PTQ result, on a ``qat`` stage where KD starts. Any of them can be preceded by ``awq: {}``
(``compress.awq``): per-input-channel scales searched on calibration text and folded into the norm
or linear before each group of linears, so that the same float function has easier weights.

The transform swaps every targeted ``nn.Linear`` (``targets`` name suffixes, minus ``ignore``) for
a ``QuantLinear``: float master weights, forward through the format's quantize-dequantize
(``compress.formats``) with a straight-through gradient; its params (scales, zero points) are
recomputed from the weight at every step, or held fixed after GPTQ. The export packs each into
the format's compressed-tensors tensors and writes the matching ``quantization_config``; the
library's own decompression gives back the fake-quant weights bit for bit (tested per format).
"""

from __future__ import annotations

import json
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
from compress.formats import WeightFormat, weight_format
from compress.awq import AwqConfig, check_awq
from compress.blockwise import BlockwiseConfig, snapshot_layers
from compress.gptq import gptq_model
from compress.kv_quant import KVQuant, KVSpec, attach_kv_quant, calibrate_kv
from compress.quant import lsq_fake_quant, representable, ste
from compress.quant_float import act_qdq
from compress.stages import StageConfig, StageMethod, register

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class WeightQuant(Strict):
    # int: integer groups (bits, group_size, symmetric); fp8: e4m3 with a scale per output channel
    # (or per_tensor); nvfp4 / mxfp4: e2m1 in blocks of 16 / 32 (bits and group_size do not apply);
    # gguf_q8_0 / gguf_q4_0: llama.cpp's blocks of 32 with an fp16 scale, rounded exactly as ggml does
    format: Literal["int", "fp8", "nvfp4", "mxfp4", "gguf_q8_0", "gguf_q4_0"] = "int"
    bits: Literal[4, 8] = 4
    group_size: int | None = Field(64, ge=8)  # None: one scale per output channel
    symmetric: bool = True
    per_tensor: bool = False  # fp8 only: one scale for the whole weight
    # int only: scales are trained with the weights (LSQ), starting from the weights' own (qat only)
    learn_scales: bool = False
    # how each block's params are picked: minmax (its range; recomputed from the weight at every step)
    # or mse (the range shrunk by the ratio in 1.00 .. 0.70 with the least squared error, fitted
    # once when the layer is quantized and then held fixed; GPTQ fits each group it quantizes so)
    observer: Literal["minmax", "mse"] = "minmax"
    # dynamic per-token quantization of each targeted linear's input (W8A8 with bits 8 / fp8)
    activations: Literal["int8", "fp8"] | None = None
    targets: list[str] = Field(default_factory=lambda: list(PROJECTIONS), min_length=1)  # module name suffixes
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    # compressed-tensors: packed values + scales (transformers, vLLM); dequantized: plain float
    # weights; gguf: final/model-<type>.gguf for llama.cpp beside a dequantized HF folder
    export: Literal["compressed-tensors", "dequantized", "gguf"] = "compressed-tensors"

    @model_validator(mode="after")
    def _exportable(self) -> "WeightQuant":
        gguf = self.format.startswith("gguf")
        if gguf and "export" not in self.model_fields_set:
            object.__setattr__(self, "export", "gguf")
        if gguf != (self.export == "gguf"):
            raise ValueError("a GGUF file holds GGUF blocks: use format gguf_q8_0 / gguf_q4_0 with export: gguf")
        if not self.symmetric and self.format != "int":
            raise ValueError(f"{self.format} is symmetric; asymmetric (symmetric: false) applies to format: int")
        if not self.symmetric and self.export == "compressed-tensors":
            raise ValueError("asymmetric weights cannot be exported as compressed-tensors here (transformers 5.24 "
                             "allocates an unpacked zero point that compressed-tensors 0.20 then unpacks): use "
                             "symmetric: true, or export: dequantized")
        if self.per_tensor and self.format != "fp8":
            raise ValueError("per_tensor applies to format: fp8; int formats use group_size (null: per channel)")
        if self.learn_scales and self.format != "int":
            raise ValueError(f"learn_scales applies to format: int; {self.format} recomputes its scales from the weights")
        if self.activations and self.export != "compressed-tensors":
            raise ValueError(f"activations: {self.activations} is applied by the serving stack from the "
                             "compressed-tensors config; use export: compressed-tensors (or drop activations)")
        return self

    def wformat(self) -> WeightFormat:
        return weight_format(self.format, self.bits, self.group_size, self.symmetric, not self.per_tensor,
                             self.observer)


class KVCacheQuant(Strict):
    """Static K/V cache quantization, scales calibrated on the run's training text."""

    format: Literal["fp8", "int8"] = "fp8"
    per_head: bool = False  # one scale per KV head (else one per tensor)
    calibration_blocks: int = Field(16, ge=1)

    def spec(self) -> KVSpec:
        return KVSpec(self.format, self.per_head)


@register_module
class QuantLinear(nn.Linear):
    """A linear whose forward uses its weight quantized and dequantized (STE in the backward),
    and, with ``activations``, its input quantized per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str = "int", bits: int = 4,
                 group_size: int | None = 64, symmetric: bool = True, per_tensor: bool = False,
                 activations: str | None = None, packed_export: bool = True, frozen: dict | None = None,
                 learn_scales: bool = False, masked: bool = False, observer: str = "minmax"):
        super().__init__(in_features, out_features, bias=bias)
        self.opts = {"fmt": fmt, "bits": bits, "group_size": group_size, "symmetric": symmetric,
                     "per_tensor": per_tensor, "activations": activations, "packed_export": packed_export,
                     "frozen": frozen, "learn_scales": learn_scales, "masked": masked, "observer": observer}
        if masked:  # a sparsity mask from an earlier sparsify stage, kept through QAT (zeros round to zero)
            self.register_buffer("mask", torch.ones(out_features, in_features))
        for key, shape in (frozen or {}).items():  # fixed quantization params (GPTQ's), as buffers qp_<key>
            self.register_buffer(f"qp_{key}", torch.zeros(shape))
        self.wformat = weight_format(fmt, bits, group_size, symmetric, not per_tensor, observer)
        self.wformat.check(in_features)
        if learn_scales:  # LSQ: a trained scale per group (and the zero point it started with, fixed)
            groups = self.wformat.spec.groups(in_features)
            self.scale = nn.Parameter(torch.ones(out_features, groups))
            self.scale.no_decay = True
            self.register_buffer("zero", torch.zeros(out_features, groups))
        self.activations, self.packed_export = activations, packed_export and self.wformat.ct_format is not None

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: WeightQuant) -> "QuantLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, cfg.format, cfg.bits, cfg.group_size,
                cfg.symmetric, cfg.per_tensor, cfg.activations, cfg.export == "compressed-tensors",
                learn_scales=cfg.learn_scales, masked=hasattr(lin, "mask"), observer=cfg.observer)
        m.to(lin.weight.device, lin.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if hasattr(lin, "mask"):
                m.mask.copy_(lin.mask)
                m.weight.mul_(m.mask.to(m.weight.dtype))
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
            if cfg.learn_scales:
                qp = m.wformat.quant_params(m.weight)
                m.scale.copy_(qp["scale"]), m.zero.copy_(qp["zero"])
        if cfg.observer != "minmax" and not cfg.learn_scales:  # a searched fit is made once, then held
            m.freeze(m.wformat.quant_params(m.masked_weight()))
        return m

    def freeze(self, qp: dict[str, torch.Tensor]) -> None:
        """Hold these quantization params fixed (else they are recomputed from the weight each step)."""
        self.opts["frozen"] = {k: list(v.shape) for k, v in qp.items()}
        for k, v in qp.items():
            self.register_buffer(f"qp_{k}", v.detach().float().to(self.weight.device))

    def qparams(self) -> dict[str, torch.Tensor]:
        if self.opts["learn_scales"]:
            return {"scale": representable(self.scale.detach().float(), self.wformat.spec.scale_dtype),
                    "zero": self.zero.float()}
        frozen = self.opts["frozen"]
        if frozen:
            return {k: getattr(self, f"qp_{k}").float() for k in frozen}
        return self.wformat.quant_params(self.masked_weight())

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask.to(self.weight.dtype) if self.opts["masked"] else self.weight

    def constrained_params(self):
        if self.opts["masked"]:
            yield self.weight, lambda w: w * self.mask.to(w.device, w.dtype)

    def quantized_weight(self) -> torch.Tensor:
        return self.wformat.qdq(self.masked_weight(), self.qparams()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations:
            x = act_qdq(x, self.activations)
        if self.opts["learn_scales"]:
            return F.linear(x, lsq_fake_quant(self.masked_weight(), self.scale, self.zero.float(), self.wformat.spec),
                            self.bias)
        w = self.masked_weight()
        return F.linear(x, ste(w, self.wformat.qdq(w, self.qparams()).to(w.dtype)), self.bias)

    def spec(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "bias": self.bias is not None, **self.opts}

    @classmethod
    def from_spec(cls, spec: dict) -> "QuantLinear":
        spec = dict(spec)
        return cls(spec.pop("in"), spec.pop("out"), spec.pop("bias"), **spec)

    def materialize(self) -> nn.Linear:
        """A plain linear holding the dequantized weight (what the fake-quant forward computes)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.quantized_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # --- the compressed-tensors export (compress.export) ---
    def export_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """compressed-tensors' tensors of this module; None: export materialized."""
        if not self.packed_export:
            return None
        out = self.wformat.pack(self.masked_weight(), dtype, self.qparams())
        if self.bias is not None:
            out["bias"] = self.bias.detach().to(dtype)
        return out

    @staticmethod
    def export_config(modules: dict[str, nn.Module], ignore: list[str]) -> dict:
        return compressed_tensors_config(modules, ignore)


def compressed_tensors_config(modules: dict[str, nn.Module], ignore: list[str]) -> dict:
    """The ``quantization_config`` of packed ``QuantLinear``s (one setting) and ``KVQuant``s."""
    linears = [m for m in modules.values() if isinstance(m, QuantLinear)]
    kvs = {m.kv for m in modules.values() if isinstance(m, KVQuant)}
    settings = {(m.wformat.ct_format, json.dumps(m.wformat.ct_scheme()), m.activations) for m in linears}
    if len(settings) != 1 or len(kvs) > 1:
        raise CompressError(f"the model mixes quantization settings {sorted(settings | kvs, key=str)}; export one "
                            "setting (one qat or quantize stage)")
    fmt, weights, act = settings.pop()
    inputs = None if act is None else {"num_bits": 8, "type": "int" if act == "int8" else "float", "symmetric": True,
                                       "dynamic": True, "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": json.loads(weights),
                                          "input_activations": inputs, "output_activations": None, "format": fmt}},
            "ignore": ignore, "kv_cache_scheme": kvs.pop().ct_scheme() if kvs else None}


def targeted_linears(model: nn.Module, cfg: WeightQuant) -> dict[str, nn.Linear]:
    """The float linears that ``targets`` name and ``ignore`` does not, by name (group sizes checked)."""
    fmt, found = cfg.wformat(), {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or isinstance(m, QuantLinear) or not any(name.endswith(t) for t in cfg.targets):
            continue
        if any(name == i or name.endswith("." + i) for i in cfg.ignore):
            continue
        fmt.check(m.in_features, name)
        found[name] = m
    return found


def quantize_linears(model: nn.Module, cfg: WeightQuant) -> dict[str, QuantLinear]:
    """Swap the targeted linears for ``QuantLinear`` (in place); returns them by name."""
    swapped = {}
    for name, m in targeted_linears(model, cfg).items():
        swapped[name] = QuantLinear.from_linear(m, cfg)
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
            cfg.wformat().check(inputs[target], target)
        elif target == "lm_head" and "lm_head" not in cfg.ignore:
            cfg.wformat().check(model_cfg.hidden_size, target)


class GPTQConfig(Strict):
    calibration_blocks: int = Field(128, ge=1)  # blocks of the run's training split (seq_len tokens each)
    block_size: int = Field(128, ge=1)          # columns per lazy-batch update
    dampening: float = Field(0.01, gt=0.0)      # fraction of mean(diag H) added to the diagonal
    act_order: bool = False                      # columns in decreasing diag(H) (static groups)


class WeightsFrom(Strict):
    """How the quantized weights are set before any training: optionally AWQ's scales first (``awq``,
    folded into the float model), then round to nearest (the params follow the weight at every step),
    or GPTQ (its compensated weights; its params then held fixed, or, with ``learn_scales``, the
    scales training starts from); then, with ``blockwise``, each decoder layer trained to reproduce
    the unquantized model's output at its depth."""

    awq: AwqConfig | None = None
    method: Literal["rtn", "gptq"] = "rtn"
    gptq: GPTQConfig = Field(default_factory=GPTQConfig)
    blockwise: BlockwiseConfig | None = None


class QatStage(WeightsFrom, DistillStage):
    """Quantization-aware training: fake-quantized linears trained by KD (or CE) on the one loop;
    with ``method: gptq`` training starts from GPTQ's weights and keeps its scales."""

    kind: Literal["qat"] = "qat"
    weights: WeightQuant = Field(default_factory=WeightQuant)
    kv_cache: KVCacheQuant | None = None  # fake-quantized K/V during training (the model learns the rounding)


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
        if cfg.awq is not None:
            check_awq(configs.get("student"))
        gguf_source(cfg.weights, recipe)

    def transform(self, model: nn.Module) -> nn.Module:
        cfg, ctx = self.cfg, self.ctx
        info = {}
        if cfg.awq is not None:  # the float model, rescaled: the same function, easier weights to quantize
            fmt = cfg.weights.wformat()
            info |= cfg.awq.run(model, {n: fmt for n in targeted_linears(model, cfg.weights)}, ctx)
        originals = snapshot_layers(model) if cfg.blockwise is not None else None  # the targets, before the swap
        swapped = quantize_linears(model, cfg.weights)  # RTN is this swap: its fake-quant forward is the quantized model
        info |= {"format": cfg.weights.wformat().name, "modules": len(swapped), "activations": cfg.weights.activations}
        if cfg.method == "gptq":
            g = cfg.gptq
            blocks = ctx.calibration(g.calibration_blocks)
            losses = gptq_model(model, blocks, swapped, ctx.recipe.train.micro_batch_size, g.block_size,
                                g.dampening, g.act_order)
            info |= {"gptq_tokens": blocks.numel(), "gptq_loss": round(sum(losses.values()), 4)}
        if cfg.blockwise is not None:
            info |= cfg.blockwise.run(model, originals, ctx)
        if cfg.kv_cache is not None:
            quants = attach_kv_quant(model, cfg.kv_cache.spec())
            blocks = ctx.calibration(cfg.kv_cache.calibration_blocks)
            calibrate_kv(model, quants, blocks, ctx.recipe.train.micro_batch_size)
            spec = cfg.kv_cache.spec()
            info |= {"kv_cache": cfg.kv_cache.format, "kv_per_head": spec.per_head, "kv_calibration_tokens": blocks.numel(),
                     "kv_bytes_per_token": spec.bytes_per_token(model.config),
                     "kv_bytes_per_token_bf16": 2 * spec.bytes_per_token(model.config)}
        self.transform_info = info
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
                       gguf_source(cfg, self.ctx.recipe), gguf_blocks(model))


def gguf_blocks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each GGUF-format ``QuantLinear``'s stored values and block scales, by weight name: what its
    forward computes, whether its scales follow the weight or are held fixed (GPTQ's), which
    re-rounding the materialized weight would not give back."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.opts["fmt"].startswith("gguf"):
            q, p, _ = m.wformat.values(m.masked_weight(), m.qparams())
            out[f"{name}.weight"] = q.detach().cpu(), p["d"].detach().cpu()
    return out


@register(QatStage)
class Qat(QuantizesWeights, Distill):
    """KD (or CE) training of the fake-quantized student on the one loop."""


class QuantizeStage(WeightsFrom, StageConfig):
    """Post-training quantization, no training: round to nearest, or GPTQ on calibration text."""

    kind: Literal["quantize"] = "quantize"
    weights: WeightQuant = Field(default_factory=WeightQuant)
    kv_cache: KVCacheQuant | None = None
    max_steps: None = None

    @model_validator(mode="after")
    def _no_training(self) -> "QuantizeStage":
        if self.weights.learn_scales:
            raise ValueError("learn_scales trains the scales: use it on a qat stage (quantize does not train)")
        return self


@register(QuantizeStage)
class Quantize(QuantizesWeights, StageMethod):
    trains = False
