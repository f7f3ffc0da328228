"""Sparsity: a one-shot ``sparsify`` transform (magnitude, Wanda or SparseGPT; 2:4, any N:M, or
unstructured) whose masks then hold through every later training stage, and exports.

    stages:
      - kind: sparsify
        method: sparsegpt            # magnitude | wanda | sparsegpt
        pattern: "2:4"               # or "4:8", or unstructured with `sparsity: 0.5`
        blockwise: {epochs: 2}       # optional: then each layer trained towards the dense output (masks held)
      - kind: distill                # KD from the dense teacher; the mask is kept at every step
      - kind: qat                    # optional: 2:4 + int4 (the zeros stay zero through the rounding)

The transform swaps each targeted ``nn.Linear`` for a ``SparseLinear`` holding a ``mask`` buffer.
The spine projects the weight onto its mask after every optimizer step, the fp32 master copy
included (``compress.constraints``), and the forward multiplies by the mask so pruned weights get
no gradient. A later ``qat`` stage carries the mask into its ``QuantLinear``s. The math is in
``compress.sparsity``.

Exports: the HF folder holds the dense weights with their zeros (transformers loads it; with a
later ``qat``, compressed-tensors' packed integers). compressed-tensors 0.20 no longer reads or
writes any 2:4 format (its ``sparse-24-bitmask`` compressor was removed), so a 2:4 run also writes
``final/sparse24.safetensors``: per linear the kept values and their positions in the documented
layout of ``compress.sparsity.pack_24`` (what our 2:4 kernels read), with int4 codes and scales
instead of float values when the linear is quantized.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from compress.blockwise import BlockwiseConfig, snapshot_layers
from compress.errors import CompressError
from compress.calibration import layerwise
from compress.modelio import register_module
from compress.sparsity import pack_24, parse_pattern, score_mask, sparsegpt
from compress.stages import StageConfig, StageMethod, earlier_stage, register

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SparsifyStage(StageConfig):
    kind: Literal["sparsify"] = "sparsify"
    method: Literal["magnitude", "wanda", "sparsegpt"] = "sparsegpt"
    pattern: str = "2:4"              # N:M, or "unstructured" (with `sparsity`)
    sparsity: float = Field(0.5, gt=0.0, lt=1.0)  # unstructured only: the fraction of each row set to 0
    targets: list[str] = Field(default_factory=lambda: list(LINEARS), min_length=1)  # module name suffixes
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    # a targeted linear whose input width is not a multiple of M: error, or leave it dense
    misfit: Literal["error", "skip"] = "error"
    calibration_blocks: int = Field(128, ge=1)  # wanda / sparsegpt
    block_size: int = Field(128, ge=1)
    dampening: float = Field(0.01, gt=0.0)
    # then each decoder layer trained towards the dense model's output at its depth, masks held
    blockwise: BlockwiseConfig | None = None
    max_steps: None = None

    @model_validator(mode="after")
    def _pattern(self) -> "SparsifyStage":
        try:
            parse_pattern(self.pattern)
        except CompressError as e:
            raise ValueError(str(e)) from None
        if "sparsity" in self.model_fields_set and self.pattern != "unstructured":
            raise ValueError(f"`sparsity` applies to pattern: unstructured; {self.pattern} fixes it at "
                             f"{1 - parse_pattern(self.pattern)[0] / parse_pattern(self.pattern)[1]:.2f}")
        return self

    def density(self) -> float:
        p = parse_pattern(self.pattern)
        return p[0] / p[1] if p else 1 - self.sparsity


@register_module
class SparseLinear(nn.Linear):
    """A linear whose weight is zero where ``mask`` is 0, kept so by the spine after every step."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, pattern: str = "2:4"):
        super().__init__(in_features, out_features, bias=bias)
        self.pattern = pattern
        self.register_buffer("mask", torch.ones(out_features, in_features))

    @classmethod
    def from_linear(cls, lin: nn.Linear, pattern: str) -> "SparseLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, pattern)
        m.to(lin.weight.device, lin.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(lin.weight)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m

    def constrained_params(self):
        yield self.weight, lambda w: w * self.mask.to(w.device, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "pattern": self.pattern}

    @classmethod
    def from_spec(cls, spec: dict) -> "SparseLinear":
        return cls(**spec)

    def materialize(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.to(self.weight.device, self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight * self.mask.to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def targeted(model: nn.Module, cfg: SparsifyStage) -> dict[str, nn.Linear]:
    """The linears ``cfg`` prunes (misfits skipped or refused as the recipe says)."""
    p = parse_pattern(cfg.pattern)
    found, misfits = {}, []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or not any(name.endswith(t) for t in cfg.targets):
            continue
        if any(name == i or name.endswith("." + i) for i in cfg.ignore):
            continue
        if p and m.in_features % p[1]:
            misfits.append(f"{name} ({m.in_features})")
            continue
        found[name] = m
    if misfits and cfg.misfit == "error":
        raise CompressError(f"{cfg.pattern} needs input widths divisible by {p[1]}: {', '.join(misfits[:3])} are not; "
                            "set `misfit: skip` to leave them dense, or add them to `ignore`")
    unmatched = [t for t in cfg.targets if not any(n.endswith(t) for n in found)]
    if unmatched and not misfits:
        raise CompressError(f"sparsity targets {unmatched} match no linear of the model; fix `targets` "
                            f"(e.g. {', '.join(LINEARS[:3])})")
    return found


def sparsify(model: nn.Module, cfg: SparsifyStage, blocks: torch.Tensor | None = None, batch_size: int = 8,
             log=print) -> dict:
    """Swap the targeted linears for ``SparseLinear`` with masks from ``cfg.method`` (in place)."""
    p = parse_pattern(cfg.pattern)
    swapped = {}
    for name, lin in targeted(model, cfg).items():
        swapped[name] = SparseLinear.from_linear(lin, cfg.pattern)
        model.set_submodule(name, swapped[name])
    if cfg.method == "magnitude":
        for m in swapped.values():
            with torch.no_grad():
                m.mask.copy_(score_mask(m.weight.detach().float().abs(), p, cfg.sparsity))
                m.weight.mul_(m.mask.to(m.weight.dtype))
        return {"modules": len(swapped)}
    if blocks is None:
        raise CompressError(f"{cfg.method} needs calibration data")

    def solve(name, m, H):
        if cfg.method == "wanda":
            score = m.weight.detach().float().abs() * torch.sqrt(torch.diag(H) / 2)[None, :]
            before = m.weight.detach().float().clone()
            m.mask.copy_(score_mask(score, p, cfg.sparsity))
            m.weight.mul_(m.mask.to(m.weight.dtype))
            d = before - m.weight.float()
            return float(torch.einsum("oi,ij,oj->", d, H, d) / 2)  # the layer's output error, as SparseGPT's
        w, mask, loss = sparsegpt(m.weight, H, p, cfg.sparsity, cfg.block_size, cfg.dampening)
        m.weight.copy_(w.to(m.weight.dtype)), m.mask.copy_(mask)
        return loss

    losses = layerwise(model, blocks, swapped, solve, batch_size, log, cfg.method)
    return {"modules": len(swapped), "calibration_tokens": blocks.numel(),
            **({"sparsegpt_loss": round(sum(losses.values()), 4)} if cfg.method == "sparsegpt" else {})}


def sparse24_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``final/sparse24.safetensors``: per 2:4 linear, ``<name>.values`` + ``<name>.meta`` (float), or
    ``<name>.codes`` (the kept int values, packed as compressed-tensors packs int4/int8) +
    ``<name>.weight_scale`` + ``<name>.meta`` when the linear is quantized (int format)."""
    from compress.quant import pack_int32

    out = {}
    for name, m in model.named_modules():
        mask = getattr(m, "mask", None)
        if mask is None or not isinstance(m, nn.Linear):
            continue
        fmt = getattr(m, "wformat", None)
        if fmt is None:
            values, meta = pack_24(m.weight.detach() * mask.to(m.weight.dtype), mask)
            out[f"{name}.values"] = values.to(dtype)
        else:
            if getattr(fmt, "spec", None) is None:
                continue  # float / GGUF formats: no 2:4 kernel layout (yet); the HF export has them
            q, p, _ = fmt.values(m.weight.detach() * mask.to(m.weight.dtype), m.qparams())
            codes, meta = pack_24(q, mask)
            out[f"{name}.codes"] = pack_int32(codes.to(torch.int8), fmt.spec.bits)
            out[f"{name}.weight_scale"] = p["scale"].to(dtype)
        out[f"{name}.meta"] = meta
        out[f"{name}.shape"] = torch.tensor([m.out_features, m.in_features])
    return out


@register(SparsifyStage)
class Sparsify(StageMethod):
    trains = False

    @classmethod
    def check(cls, cfg, recipe, configs: dict) -> None:
        before = earlier_stage(cfg, recipe, ("qat", "quantize"))
        if before:
            raise CompressError(f"a sparsify stage after a {before} stage is not supported: the quantized "
                                "linears would need re-rounding after pruning; sparsify first (sparsify -> "
                                "distill -> qat)")
        model_cfg = configs.get("student")
        unknown = [t for t in cfg.targets if t not in LINEARS and t != "lm_head"]
        if model_cfg is not None and unknown:
            raise CompressError(f"sparsity targets {unknown} match no linear of a {model_cfg.model_type} model; "
                                f"use some of {', '.join(LINEARS)} (or lm_head)")
        p = parse_pattern(cfg.pattern)
        if model_cfg is not None and p and cfg.misfit == "error":
            from compress.models import head_dim

            widths = {"o_proj": model_cfg.num_attention_heads * head_dim(model_cfg),
                      "down_proj": model_cfg.intermediate_size}
            bad = [f"{t} ({widths.get(t, model_cfg.hidden_size)})" for t in cfg.targets
                   if widths.get(t, model_cfg.hidden_size) % p[1]]
            if bad:
                raise CompressError(f"{cfg.pattern} needs input widths divisible by {p[1]}: {', '.join(bad)} are "
                                    "not; set `misfit: skip` to leave them dense, or add them to `ignore`")

    def transform(self, model: nn.Module) -> nn.Module:
        cfg, ctx = self.cfg, self.ctx
        originals = snapshot_layers(model) if cfg.blockwise is not None else None  # the dense targets
        blocks = ctx.calibration(cfg.calibration_blocks) if cfg.method != "magnitude" else None
        info = sparsify(model, cfg, blocks, ctx.recipe.train.micro_batch_size)
        if cfg.blockwise is not None:
            info |= cfg.blockwise.run(model, originals, ctx)
        masks = [m.mask for m in model.modules() if isinstance(m, SparseLinear)]
        kept = sum(float(x.sum()) for x in masks)
        self.transform_info = {"method": cfg.method, "pattern": cfg.pattern, **info,
                               "density": round(kept / sum(x.numel() for x in masks), 4)}
        return model

    def export(self, model: nn.Module, final_dir) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        from compress.checkpoint import publish_file

        if self.cfg.pattern != "2:4":
            return
        dtype = next(model.parameters()).dtype
        tensors = sparse24_tensors(model, dtype)
        if tensors:
            publish_file(Path(final_dir) / "sparse24.safetensors", lambda tmp: save_file(
                {k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                metadata={"layout": "compress.sparsity.pack_24 v1"}))
