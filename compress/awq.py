"""AWQ (Lin et al. 2024): activation-aware per-input-channel scales that make a linear's weights
cheaper to quantize, folded into the op before it so the float model computes the same function.

    awq_model(model, blocks, formats)   # formats: linear name -> the WeightFormat it will be quantized in

A weight column that meets large inputs matters more: scaling column j by s_j > 1 (and the input
by 1 / s_j) gives it a finer share of its group's grid. Each decoder layer has four groups of
linears that read one input, and the op that makes that input takes the 1 / s:

    q, k, v     <- input_layernorm            (its weight divided by s)
    o           <- v                          (v's output rows divided by s: attention mixes tokens,
                                               not channels; with GQA one s per KV channel, shared by
                                               the query heads that read it)
    gate, up    <- post_attention_layernorm
    down        <- up                         (act(gate) * up is linear in up)

Per group, s = m^alpha / sqrt(max(m^alpha) * min(m^alpha)) with m the inputs' mean |x| per channel,
and alpha in 0, 1/grid, ..., 1 the one with the least output error on calibration text, summed over
the group's linears: tr(dW H dW^T), dW = Q(W diag s) diag s^-1 - W, H = X^T X / tokens (Q: round to
nearest in the linear's own format). alpha = 0 is s = 1, so no group gets worse on that text. The
layers run in order on the float model (``compress.calibration.each_layer``); the quantization that
follows (round to nearest, GPTQ, block-wise, QAT) sees the scaled weights. On SmolLM2, int4 g64,
16k calibration tokens: KL to the teacher after round to nearest 0.421 -> 0.232 (README, Results).
"""

from __future__ import annotations

import time
from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import nn

from compress.calibration import decoder_layers, each_layer, input_moments
from compress.config import Strict
from compress.errors import CompressError
from compress.formats import WeightFormat
from compress.models import head_dim

# (the op whose output feeds the group, the group's linears), as attribute paths in a decoder layer
GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("self_attn.v_proj", ("self_attn.o_proj",)),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp.up_proj", ("mlp.down_proj",)))
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder layers laid out as GROUPS says


class AwqConfig(Strict):
    """A ``quantize`` / ``qat`` stage's ``awq:`` option: scales searched before the weights are quantized."""

    calibration_blocks: int = Field(128, ge=1)  # blocks of the run's training split (seq_len tokens each)
    grid: int = Field(20, ge=1)                 # alpha in 0, 1/grid, ..., 1
    # activation: s = m^alpha; duo: s = m^alpha / w^(1 - alpha), w the columns' mean |W| relative to their
    # quantization block's max (AutoAWQ's and llm-compressor's duo_scaling); both: the better of the two
    scales: Literal["activation", "duo", "both"] = "activation"

    def run(self, model: nn.Module, formats: dict[str, WeightFormat], ctx) -> dict:
        """``awq_model`` on the run's calibration text; what the transform reports."""
        t0 = time.time()
        blocks = ctx.calibration(self.calibration_blocks)
        stats = awq_model(model, blocks, formats, self.grid, self.scales, ctx.recipe.train.micro_batch_size)
        return {"awq_tokens": blocks.numel(), "awq_seconds": round(time.time() - t0, 1),
                "awq_alpha_mean": round(sum(s.alpha for s in stats.values()) / len(stats), 3),
                "awq_duo_groups": sum(s.duo for s in stats.values()), "awq_groups": len(stats),
                "awq_error_ratio": round(sum(s.error for s in stats.values()) / sum(s.base for s in stats.values()), 4)}


class GroupScale(NamedTuple):
    alpha: float
    duo: bool     # s = m^alpha / w^(1 - alpha) rather than m^alpha
    error: float  # group_error with s
    base: float   # group_error without a scale


def check_awq(model_cfg) -> None:
    """Before any weights load: AWQ folds its scales into Llama-like decoder layers only."""
    if model_cfg is not None and model_cfg.model_type not in MODEL_TYPES:
        raise CompressError(f"awq folds its scales into {', '.join(MODEL_TYPES)} decoder layers, not "
                            f"{model_cfg.model_type}'s; drop `awq` from the stage (method: gptq compensates instead)")


def group_error(weights: list[torch.Tensor], fmts: list[WeightFormat], H: torch.Tensor, s: torch.Tensor) -> float:
    """Sum over the linears of tr(dW H dW^T), dW = Q(W diag s) diag s^-1 - W: their output squared
    error per token when the input is divided by s and the columns multiplied by it."""
    err = 0.0
    for w, fmt in zip(weights, fmts):
        dw = fmt.qdq(w * s) / s - w
        err += ((dw @ H) * dw).sum().item()
    return err


def relative_weight(weights: list[torch.Tensor], fmts: list[WeightFormat]) -> torch.Tensor:
    """Per input column, the mean over the group's rows of |W| / (its quantization block's max |W|)."""
    rel = []
    for w, fmt in zip(weights, fmts):
        g = fmt.grouped(w).abs()
        rel.append((g / g.amax(-1, keepdim=True).clamp_min(1e-8)).reshape(w.shape))
    return torch.cat(rel).mean(0)


def search_scale(weights: list[torch.Tensor], fmts: list[WeightFormat], H: torch.Tensor, mean_abs: torch.Tensor,
                 grid: int, scales: str = "activation", expand=lambda s: s,
                 reduce=lambda m: m) -> tuple[torch.Tensor, GroupScale]:
    """(s, its GroupScale): of alpha in 0, 1/grid, ..., 1 (and s = m^alpha or m^alpha / w^(1 - alpha), as
    ``scales`` says), the s with the least ``group_error``. s has one entry per ``mean_abs`` channel;
    ``expand`` maps it onto the linears' input columns and ``reduce`` maps a per-column statistic onto it."""
    m = mean_abs.float().clamp_min(1e-5)
    kinds = {"activation": (False,), "duo": (True,), "both": (False, True)}[scales]
    w = reduce(relative_weight(weights, fmts)).clamp_min(1e-4) if True in kinds else None
    base = group_error(weights, fmts, H, expand(torch.ones_like(m)))
    best = torch.ones_like(m), GroupScale(0.0, False, base, base)
    for i in range(1, grid + 1):
        for duo in kinds:
            s = m.pow(i / grid) / (w.pow(1 - i / grid) if duo else 1)
            s = s / (s.max() * s.min()).sqrt()
            err = group_error(weights, fmts, H, expand(s))
            if err < best[1].error:
                best = s, GroupScale(i / grid, duo, err, base)
    return best


def _fold(source: nn.Module, s: torch.Tensor) -> None:
    """Divide the output channels of ``source`` (a norm's weight, or a linear's rows) by ``s``."""
    w = source.weight
    w.copy_((w.float() / (s if w.ndim == 1 else s[:, None])).to(w.dtype))
    if getattr(source, "bias", None) is not None:
        source.bias.copy_((source.bias.float() / s).to(source.bias.dtype))


@torch.no_grad()
def awq_model(model: nn.Module, blocks: torch.Tensor, formats: dict[str, WeightFormat], grid: int = 20,
              scales: str = "activation", batch_size: int = 8, log=print) -> dict[str, GroupScale]:
    """Search and fold AWQ scales into every decoder layer of ``model`` (float, not yet quantized) for
    the linears named in ``formats``; returns each group's ``GroupScale``, named by its first linear."""
    cfg = model.config
    check_awq(cfg)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = head_dim(cfg)
    share = heads // kv_heads

    def kv_expand(s):  # one scale per KV channel -> o_proj's input columns (head h reads KV head h // share)
        return s.view(kv_heads, 1, hd).expand(kv_heads, share, hd).reshape(-1)

    def kv_mean(m):  # o_proj's inputs' mean |x| per column -> per KV channel
        return m.view(kv_heads, share, hd).mean(1).reshape(-1)

    stats: dict[str, GroupScale] = {}

    def step(li, layer, run, tokens):
        prefix = f"model.layers.{li}."
        groups = []
        for source, paths in GROUPS:
            mine = [p for p in paths if prefix + p in formats]
            if mine:
                groups.append((source, mine))
        xtx, abs_sum = input_moments({source: layer.get_submodule(mine[0]) for source, mine in groups}, run,
                                     absolute=True)
        for source, mine in groups:
            lins = [layer.get_submodule(p) for p in mine]
            o_group = source == "self_attn.v_proj"
            mean_abs = abs_sum[source] / tokens
            s, stats[prefix + mine[0]] = search_scale(
                [lin.weight.float() for lin in lins], [formats[prefix + p] for p in mine], xtx[source] / tokens,
                kv_mean(mean_abs) if o_group else mean_abs, grid, scales,
                *((kv_expand, kv_mean) if o_group else ()))
            full = kv_expand(s) if o_group else s
            for lin in lins:
                lin.weight.copy_((lin.weight.float() * full).to(lin.weight.dtype))
            _fold(layer.get_submodule(source), s)
        log(f"awq: layer {li + 1}/{len(decoder_layers(model))}, alphas " + " ".join(
            f"{stats[prefix + mine[0]].alpha:.2f}{'d' if stats[prefix + mine[0]].duo else ''}" for _, mine in groups))

    each_layer(model, blocks, step, batch_size)
    return stats
