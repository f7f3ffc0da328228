"""Weight-only quantized GEMM / GEMV (W4A16, W8A16): y = x @ dequant(W)^T, the weight dequantized in
registers, never in memory.

Layout read (compressed-tensors ``pack-quantized``, what our QAT/PTQ exports write):
    packed  (N, K * b / 32) int32   value k of row n sits at bits [(k % P) * b, +b) of word k // P,
                                    P = 32 / b values per word, stored offset-binary (q + 2^(b-1))
    scale   (N, K / G)  fp16/bf16/fp32, one per group of G input columns
    zero    (N, K / G)  int8 or None (symmetric)
    W[n, k] = (q[n, k] - zero[n, k // G]) * scale[n, k // G]

Tiling: one program computes a (BLOCK_M, BLOCK_N) tile of y over a K range; each K step loads a
(BLOCK_M, BLOCK_K) tile of x and the (BLOCK_K, BLOCK_N) tile of packed words it needs (each word
loaded for the P values in it: the cache serves the repeats), unpacks with a shift and a mask,
scales, and accumulates in fp32 with ``tl.dot``. Decode (M <= 16) splits K across SPLIT_K
programs, each writing fp32 partial sums that the host adds: more programs for a GEMV that would
otherwise occupy N / BLOCK_N of them.

Three names, in one place: ``triton_wna16`` (host), ``_wna16_kernel`` (jit), ``torch_wna16`` (reference).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the reference path still works
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BITS = (4, 8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """(N, words) int32 -> (N, k) int32 values in [-2^(b-1), 2^(b-1))."""
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then masked: the raw bits
    return u.reshape(packed.shape[0], -1)[:, :k] - (1 << (bits - 1))


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, k: int) -> torch.Tensor:
    """The float32 weight (N, K) the layout stores."""
    q = unpack(packed, bits, k).float()
    group = k // scale.shape[1]
    s = scale.float().repeat_interleave(group, 1)
    z = zero.float().repeat_interleave(group, 1) if zero is not None else 0.0
    return (q - z) * s


def torch_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: dequantize, then a float32 matmul; returned in x's dtype."""
    k = x.shape[-1]
    y = x.float() @ dequantize(packed, scale, zero, bits, k).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> None:
    """One-line errors for what the kernel does not take (before anything is allocated)."""
    if bits not in BITS:
        raise ValueError(f"W{bits}A16 is not supported; bits must be one of {BITS}")
    k, n = x.shape[-1], packed.shape[0]
    if k % (32 // bits):
        raise ValueError(f"K={k} must be a multiple of {32 // bits} (values per int32 word at {bits} bits)")
    if packed.shape[1] * (32 // bits) != k:
        raise ValueError(f"packed weight {tuple(packed.shape)} does not hold K={k} {bits}-bit values per row")
    groups = scale.shape[1]
    if scale.shape[0] != n or k % groups:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit N={n}, K={k}: need (N, K / group_size)")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"zero point {tuple(zero.shape)} must have the scale's shape {tuple(scale.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32; got {x.dtype}")


if triton is not None:
    @triton.jit
    def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, GROUP, K_PER_SPLIT,
                      stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                      BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        PER: tl.constexpr = 32 // BITS
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * K_PER_SPLIT
        for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            # (BLOCK_K, BLOCK_N) tile of W^T: value k of row n from word k // PER
            w_mask = k_ok[:, None] & (offs_n[None, :] < N)
            words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k // PER)[:, None], mask=w_mask, other=0)
            shift = ((offs_k % PER) * BITS)[:, None]
            q = ((words >> shift) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
            g = (offs_k // GROUP)[:, None]
            s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g, mask=w_mask, other=0.0).to(tl.float32)
            w = q.to(tl.float32)
            if HAS_ZERO:
                w = w - tl.load(z_ptr + offs_n[None, :] * stride_sn + g, mask=w_mask, other=0).to(tl.float32)
            w = w * s
            acc += tl.dot(x.to(tl.float32), w)
        y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def launch_config(m: int, n: int, k: int, group: int) -> dict:
    """Tile sizes and the K split: one config (the interpreter takes no autotuning), chosen by M."""
    block_k = 32 if INTERPRET else 64
    if m <= 16:  # decode: a GEMV-like tile, K split so that ~4 programs work per output block
        block_m, block_n = 16, 64 if not INTERPRET else 32
        split = max(1, min(8, k // (block_k * 4)))
    else:
        block_m, block_n, split = (32, 32, 1) if INTERPRET else (64, 64, 1)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "split": triton.cdiv(k, k_per_split),
            "k_per_split": k_per_split}


def triton_wna16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for the packed weight; x (..., K) fp16/bf16/fp32; y in x's dtype."""
    if triton is None:
        raise RuntimeError("triton is not installed: use torch_wna16, or pip install triton")
    check(x, packed, scale, zero, bits)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], packed.shape[0]
    group = k // scale.shape[1]
    cfg = launch_config(m, n, k, group)
    partial = torch.empty(cfg["split"], m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), cfg["split"])
    packed, scale = packed.contiguous(), scale.contiguous()
    zero_arg = zero.contiguous() if zero is not None else scale
    _wna16_kernel[grid](x2, packed, scale, zero_arg, partial, m, n, k, group, cfg["k_per_split"],
                        x2.stride(0), packed.stride(0), scale.stride(0), partial.stride(1), partial.stride(0),
                        BITS=bits, HAS_ZERO=zero is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                        BLOCK_K=cfg["BLOCK_K"])
    y = partial.sum(0) if cfg["split"] > 1 else partial[0]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)
