"""Integer quantization formats: quantize / dequantize, fake-quant with a straight-through
estimator, and the packed storage layout the exports and kernels read.

    spec = IntSpec(bits=4, group_size=64, symmetric=True)
    q, scale, zero = quantize(w, spec)               # q: int8 holding values in [qmin, qmax]
    w_hat = dequantize(q, scale, zero, spec)          # (q - zero) * scale, per group
    w_fq = fake_quant(w, spec)                        # == w_hat forward, identity gradient (STE)
    packed = pack_int32(q, bits=4)                    # 8 values per int32 word, along the input dim

The math (weights W of shape (out, in), groups of ``g`` consecutive input columns; per-channel is
g = in):
    symmetric:   scale = |m| / qmax if m > 0 else |m| / -qmin,   m = the group's largest-magnitude value,
                 zero = 0
    asymmetric:  scale = (max W_group - min W_group) / (qmax - qmin),
                 zero  = clamp(qmin - round(min W_group / scale), qmin, qmax)
    q = clamp(round(W / scale) + zero, qmin, qmax),   W_hat = (q - zero) * scale
with qmin, qmax = -2^(b-1), 2^(b-1) - 1 (int4: -8..7, int8: -128..127) and round half to even
(torch.round). The symmetric scale puts the group's largest-magnitude value exactly on the grid's
end on its side: a negative one on qmin (int4: -8), a grid 8/7 finer than the usual max|W| / qmax,
which never uses -8; positive values then clip by at most one step (GGUF's Q4_0 picks its scale the
same way). Same format, same export. On SmolLM2 int4 g64 round to nearest (KL to the teacher, 48
held-out blocks): 0.524 with max|W| / qmax, 0.461 with the smallest scale that clips nothing
(max(max W / qmax, min W / qmin)), **0.421** with this one; peers' max|W| / 7.5, which clips the
largest magnitude by half a step, 0.578. An all-zero group gets scale 1 (its values quantize to 0 exactly). Each scale is
then rounded UP to a value of ``scale_dtype`` (bf16 by default: what the export stores), so the
fake-quant forward, the export and its decompression use the very same scale; and since an int4
or int8 value times a bf16 scale rounds once to bf16, a bf16 export's weights equal the fp32
fake-quant weights cast to bf16, bit for bit.

Packing (``pack_int32``; compressed-tensors' ``pack-quantized`` layout): each value is offset to
unsigned (q + 2^(b-1)), and value i of a row sits at bits [i*b, i*b + b) of the row's int32 words,
little end first; a row of n values takes ceil(n*b / 32) words. ``unpack_int32`` inverts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress.errors import CompressError


@dataclass(frozen=True)
class IntSpec:
    bits: int = 4
    group_size: int | None = 64  # None: one scale per output channel
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16  # scales are values of this dtype (what the export stores)

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int, name: str = "weight") -> int:
        """Groups per row; a group size that does not divide the row is an error naming a fix."""
        if self.bits not in (2, 3, 4, 8):
            raise CompressError(f"{self.bits}-bit integers are not supported; use bits 4 or 8 (or 2, 3)")
        g = self.group_size or in_features
        if in_features % g:
            fits = [x for x in (32, 64, 128, 256) if in_features % x == 0]
            raise CompressError(f"group_size {g} does not divide {name}'s {in_features} input features; use "
                                f"{' or '.join(map(str, fits)) if fits else 'per-channel (group_size: null)'} "
                                "or add the module to `ignore`")
        return in_features // g


def _grouped(w: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    out, cols = w.shape
    return w.reshape(out, spec.groups(cols), -1)  # (out, groups, g)


def _qparams(wg: torch.Tensor, spec: IntSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of grouped float weights, each (out, groups): float32 scales, integer-valued zeros."""
    if spec.symmetric:  # the group's largest magnitude lands on the grid's end on its side: -8 or +7 (int4)
        lo, hi = -wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = torch.where(lo > hi, lo / -spec.qmin, hi / spec.qmax)
        zero = torch.zeros_like(scale)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the range holds 0 exactly
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zero = (spec.qmin - torch.round(lo / torch.where(scale > 0, scale, 1))).clamp(spec.qmin, spec.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return representable(scale, spec.scale_dtype), zero


def representable(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of ``dtype`` at or above each element of ``x`` (as float32): a scale
    rounded up never clips the group's largest weight, and the export stores it exactly."""
    y = x.to(dtype)
    y = torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y.float()


def quantize(w: torch.Tensor, spec: IntSpec):
    """(q int8 (out, in), scale (out, groups), zero (out, groups)) of a weight (out, in)."""
    wg = _grouped(w.detach().float(), spec)
    scale, zero = _qparams(wg, spec)
    return int_round(wg, scale[..., None], zero[..., None], spec).reshape(w.shape).to(torch.int8), scale, zero


def int_round(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero, qmin, qmax), as float (scale, zero broadcast to x)."""
    return torch.clamp(torch.round(x / scale) + zero, spec.qmin, spec.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: IntSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = _grouped(q.float(), spec)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(q.shape).to(dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_hat):
        return x_hat

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``x_hat`` exactly in the forward, identity gradient to ``x`` in the backward. (The usual
    ``x + (x_hat - x).detach()`` is not ``x_hat`` in bf16: the add rounds.)"""
    return _StraightThrough.apply(x, x_hat.to(x.dtype).detach())


def fake_quant(w: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity in the backward (straight-through)."""
    q, scale, zero = quantize(w, spec)
    return ste(w, dequantize(q, scale, zero, spec, w.dtype))


def lsq_fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Fake quant with a learned scale (LSQ, Esser et al. 2020): differentiable in ``w`` and in
    ``scale`` (out, groups). The rounding passes gradients straight through; values clamped to
    the range get none for w; the scale's gradient is the LSQ one, sum of (q - zero) - w/s over
    its group. The forward uses the scale rounded up to ``spec.scale_dtype`` (what the export
    stores), so it equals ``dequantize`` with that scale exactly."""
    s = ste(scale, representable(scale.detach().float(), spec.scale_dtype))[..., None]
    x = _grouped(w, spec) / s
    q = torch.clamp(ste(x, torch.round(x)) + zero[..., None], spec.qmin, spec.qmax)
    return ((q - zero[..., None]) * s).reshape(w.shape).to(w.dtype)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) int8 values in [-2^(b-1), 2^(b-1)) -> (rows, ceil(n*b/32)) int32 words."""
    rows, n = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    words = math.ceil(n * bits / 32)
    pos = torch.arange(n, device=q.device) * bits
    word, shift = pos // 32, pos % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=q.device)
    out.scatter_add_(1, word.expand(rows, n), u << shift)
    spill = shift + bits - 32  # the high bits of a value that crosses a word boundary
    cross = spill > 0
    if cross.any():
        out.scatter_add_(1, (word[cross] + 1).expand(rows, -1), u[:, cross] >> (bits - spill[cross]))
    out = out[:, :words] & 0xFFFFFFFF
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # two's complement words


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: (rows, words) int32 -> (rows, n) int8."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
    pos = torch.arange(n, device=packed.device) * bits
    word, shift = pos // 32, pos % 32
    both = w[:, word] | (w[:, word + 1] << 32)  # 64 bits starting at the value's word
    u = (both >> shift) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)


# ---------------------------------------------------------------- GGUF blocks (llama.cpp)
#
# Blocks of 32 consecutive input columns, one fp16 scale d each, computed as ggml does (and the
# `gguf` package, which matches ggml-quants.c bit for bit), in float32:
#   Q8_0: d = max|x| / 127;                    q = roundf(x * (1/d))           (half away from zero)
#   Q4_0: d = x[argmax|x|] / -8 (signed);      q = min(trunc(x * (1/d) + 8.5), 15) - 8
# and the stored d is fp16: x_hat = q * fp16(d). An all-zero block has d = 0 and x_hat = 0.
# In the file a block is d's two bytes (little end first), then the values: Q8_0 32 int8 bytes, Q4_0
# 16 bytes of q + 8, value j in the low nibble of byte j and value j + 16 in its high nibble.
GGUF_BLOCK = 32


def gguf_quantize(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in) in [-8, 7] or [-127, 127], d float16 (out, in / 32)) of a weight (out, in)."""
    out, cols = w.shape
    if cols % GGUF_BLOCK:
        raise CompressError(f"GGUF {kind} packs blocks of {GGUF_BLOCK} input features; {cols} is not a multiple")
    x = w.detach().float().reshape(out, cols // GGUF_BLOCK, GGUF_BLOCK)
    d = gguf_scale(x, kind)
    return gguf_round(x, d, kind).reshape(out, cols).to(torch.int8), d.squeeze(-1).to(torch.float16)


def gguf_scale(x: torch.Tensor, kind: str) -> torch.Tensor:
    """float32 d (..., 1) of blocks x (..., 32), before its fp16 rounding."""
    if kind not in ("q8_0", "q4_0"):
        raise CompressError(f"GGUF type {kind!r} is not supported; use q8_0 or q4_0")
    if kind == "q8_0":
        return x.abs().amax(-1, keepdim=True) / 127
    return x.gather(-1, x.abs().argmax(-1, keepdim=True)) / -8


def gguf_round(x: torch.Tensor, d: torch.Tensor, kind: str) -> torch.Tensor:
    """ggml's integer values (as float) of x with the float32 block scale d (broadcast to x)."""
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    if kind == "q8_0":  # the clamp changes nothing for ggml's own d; it keeps a fixed d's values int8 (GPTQ's)
        a = (x * inv).abs()
        return (torch.sign(x * inv) * (a.floor() + (2 * (a - a.floor())).floor())).clamp(-127, 127)
    return torch.trunc(x * inv + 8.5).clamp(0, 15) - 8


def gguf_dequantize(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out, cols = q.shape
    x = q.float().reshape(out, cols // GGUF_BLOCK, GGUF_BLOCK) * d.float()[..., None]
    return x.reshape(out, cols).to(dtype)


def pack_gguf(q: torch.Tensor, d: torch.Tensor, kind: str) -> "np.ndarray":
    """The bytes ggml stores for values q (rows, cols) with block scales d (rows, cols / 32): a uint8
    array (rows, blocks * block bytes), whatever chose d (ggml's own rule, GPTQ, a trained scale)."""
    import numpy as np

    if kind not in ("q8_0", "q4_0"):
        raise CompressError(f"GGUF type {kind!r} is not supported; use q8_0 or q4_0")
    rows, cols = q.shape
    qs = q.to(torch.int8).reshape(rows, cols // GGUF_BLOCK, GGUF_BLOCK)
    lo, hi = (-8, 7) if kind == "q4_0" else (-127, 127)
    if q.min() < lo or q.max() > hi:
        raise CompressError(f"{kind.upper()} values are in [{lo}, {hi}]; these are not {kind.upper()} codes")
    if kind == "q4_0":
        u = (qs + 8).to(torch.uint8)
        qs = u[..., :GGUF_BLOCK // 2] | (u[..., GGUF_BLOCK // 2:] << 4)
    scale = d.detach().to(torch.float16).cpu().numpy().reshape(rows, -1, 1).view(np.uint8)
    return np.concatenate([scale, qs.cpu().numpy().view(np.uint8)], axis=-1).reshape(rows, -1)


def gguf_fake_quant(w: torch.Tensor, kind: str) -> torch.Tensor:
    """The GGUF block format's rounding in the forward pass, identity in the backward."""
    return ste(w, gguf_dequantize(*gguf_quantize(w, kind), w.dtype))
