"""Integer quantization formats: quantize / dequantize, fake-quant with a straight-through
estimator, and the packed storage layout the exports and kernels read.

    spec = IntSpec(bits=4, group_size=64, symmetric=True)
    q, scale, zero = quantize(w, spec)               # q: int8 holding values in [qmin, qmax]
    w_hat = dequantize(q, scale, zero, spec)          # (q - zero) * scale, per group
    w_fq = fake_quant(w, spec)                        # == w_hat forward, identity gradient (STE)
    packed = pack_int32(q, bits=4)                    # 8 values per int32 word, along the input dim

The math (weights W of shape (out, in), groups of ``g`` consecutive input columns; per-channel is
g = in):
    symmetric:   scale = max|W_group| / qmax,              zero = 0
    asymmetric:  scale = (max W_group - min W_group) / (qmax - qmin),
                 zero  = clamp(qmin - round(min W_group / scale), qmin, qmax)
    q = clamp(round(W / scale) + zero, qmin, qmax),   W_hat = (q - zero) * scale
with qmin, qmax = -2^(b-1), 2^(b-1) - 1 (int4: -8..7, int8: -128..127) and round half to even
(torch.round). An all-zero group gets scale 1 (its values quantize to 0 exactly).

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


def qparams(w: torch.Tensor, spec: IntSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each (out, groups), float32 scales and integer-valued float zeros."""
    wg = _grouped(w.detach().float(), spec)
    if spec.symmetric:
        scale = wg.abs().amax(-1) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the range holds 0 exactly
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zero = (spec.qmin - torch.round(lo / torch.where(scale > 0, scale, 1))).clamp(spec.qmin, spec.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def quantize(w: torch.Tensor, spec: IntSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None):
    """(q int8 (out, in), scale (out, groups), zero (out, groups)) of a weight (out, in)."""
    if scale is None:
        scale, zero = qparams(w, spec)
    wg = _grouped(w.detach().float(), spec)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], spec.qmin, spec.qmax)
    return q.reshape(w.shape).to(torch.int8), scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: IntSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    qg = _grouped(q.float(), spec)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(q.shape).to(dtype)


def fake_quant(w: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Quantize-dequantize in the forward pass, identity in the backward (straight-through)."""
    q, scale, zero = quantize(w, spec)
    w_hat = dequantize(q, scale, zero, spec, w.dtype)
    return w + (w_hat - w).detach()


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
